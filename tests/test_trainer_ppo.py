"""PPO on the real model: the per-token layout it trains on, and a PPO round against a reward
model trained in the same round, published as a policy the server then serves."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry
from test_trainer_reward import mixed_feedback
from trainer_fixtures import tiny_config

from tuneloop.server.registry import AdapterRegistry
from tuneloop.trainer.config import PPOConfig, RewardConfig
from tuneloop.trainer.metrics import TrainerMetrics
from tuneloop.trainer.ppo import completion_grid
from tuneloop.trainer.runner import run_round
from tuneloop.v1 import generation_pb2 as pb
from tuneloop.v1 import generation_pb2_grpc as pb_grpc


def test_completion_grid_puts_each_reply_token_in_its_slot() -> None:
    # Two sequences, right-padded: prompt 2 + reply 3, prompt 3 + reply 1.
    comp = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 0]])
    rows, cols, slots, mask = completion_grid(comp)
    assert rows.tolist() == [0, 0, 0, 1] and cols.tolist() == [1, 2, 3, 2] and slots.tolist() == [0, 1, 2, 0]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def tiny_ppo(**kw: object) -> PPOConfig:
    base: dict[str, object] = dict(
        ppo_iterations=3, ppo_prompts_per_iteration=4, ppo_samples_per_prompt=2, ppo_max_new_tokens=12,
        ppo_epochs=1, ppo_minibatch_size=4, ppo_learning_rate=1e-3, ppo_kl_ceiling=5.0,
    )  # fmt: skip
    base.update(kw)
    return PPOConfig(**base)  # type: ignore[arg-type]


@pytest.mark.engine
async def test_a_ppo_round_publishes_a_policy_the_server_serves(make_server, model_dir: Path) -> None:
    import asyncio

    server = await make_server(default_adapter="toy")
    reg = AdapterRegistry(server.config.adapter_dir)
    rc = RewardConfig(reward_epochs=2, reward_batch_size=4, reward_learning_rate=1e-3,
                      reward_max_prompt_tokens=48, reward_max_completion_tokens=24)  # fmt: skip
    cfg = tiny_config(str(reg.root), str(model_dir), algo="ppo", reward=rc, ppo=tiny_ppo())
    # Three toy iterations on 8 rollouts need not raise the reward: this test is about the round's
    # plumbing (lineage, report, publish, serve). That PPO raises the reward is tested below.
    cfg.gate.max_kl_per_token = 50.0
    cfg.gate.min_reward_gain = -1e9
    metrics = TrainerMetrics(CollectorRegistry())
    result = await asyncio.to_thread(run_round, cfg, mixed_feedback(), reg, metrics=metrics)
    assert result.outcome in ("published", "rejected"), result.reason
    v = reg.get("toy", "v1")
    assert v.kind == "policy" and v.manifest["algorithm"] == "ppo"
    assert v.manifest["reward_model"] == {"name": "toy-reward", "version": "v1"}
    assert reg.get("toy-reward", "v1").kind == "reward"  # lineage: feedback -> reward model -> policy
    its = v.manifest["ppo"]["iterations"]
    # k1 KL estimates of one small batch can dip below 0; they must be finite and small here.
    assert len(its) == 3 and all(abs(s["kl_per_token"]) < 5.0 for s in its)
    assert {"score", "approx_kl", "clip_fraction", "entropy", "value_loss"} <= its[0].keys()
    assert (v.path / "report.md").is_file() and (v.path / "report.png").stat().st_size > 1000
    assert metrics.registry.get_sample_value("tuneloop_trainer_ppo_iterations_total") == 3.0
    assert "reward_gain" in v.manifest["metrics"]
    if result.outcome == "rejected":
        pytest.fail(f"the toy PPO candidate was rejected: {result.reason}")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        for _ in range(100):
            r = await stub.Generate(pb.GenerateRequest(prompt="Hi", sampling=pb.SamplingParams(max_tokens=2)))
            if r.completions[0].adapter.version == "v1":
                break
            await asyncio.sleep(0.1)
        assert (r.completions[0].adapter.name, r.completions[0].adapter.version) == ("toy", "v1")
