from __future__ import annotations

from warmserve.deployments.auth import authorized, rollout_problem, sign_rollout


def test_rollouts_need_a_matching_signature_when_a_token_is_set() -> None:
    config = {"weights": "s3://b/w.safetensors", "weights_version": "v2"}
    assert rollout_problem(config, None) is None
    assert "unsigned" in (rollout_problem(config, "t0ken") or "")
    signed = {**config, "signature": sign_rollout("t0ken", "s3://b/w.safetensors", "v2")}
    assert rollout_problem(signed, "t0ken") is None
    assert "does not match" in (rollout_problem(signed, "other") or "")
    tampered = {**signed, "weights": "s3://evil/w.safetensors"}
    assert "does not match" in (rollout_problem(tampered, "t0ken") or "")


def test_bearer_token() -> None:
    assert authorized(None, None)
    assert not authorized(None, "t") and not authorized("Bearer x", "t")
    assert authorized("Bearer t", "t")
