"""PPO on the real model: the per-token layout it trains on; PPO iterations raising a reward with
bounded KL; and a sidecar round (`--algo ppo`) against a reward model trained in the same round,
published as a policy the server then serves and names on its responses."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry
from test_trainer_reward import mixed_feedback
from trainer_fixtures import tiny_config

from tuneloop.server.registry import AdapterRegistry
from tuneloop.trainer.config import PPOConfig, RewardConfig, SidecarConfig
from tuneloop.trainer.metrics import TrainerMetrics
from tuneloop.trainer.ppo import completion_grid
from tuneloop.trainer.sidecar import Sidecar
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
    cfg.sidecar = SidecarConfig(min_new_pairs=4, min_new_pairs_periodic=4, metrics_port=0)
    metrics = TrainerMetrics(CollectorRegistry())
    # Through the sidecar, as `tuneloop trainer run --algo ppo` runs it.
    result = await asyncio.to_thread(Sidecar(cfg, mixed_feedback(), reg, metrics).tick)
    assert result is not None and result.outcome in ("published", "rejected"), result
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


def test_ppo_iterations_raise_the_reward_with_bounded_kl(model_dir: Path) -> None:
    """PPO against a rule reward on the real model: +1 when the reply starts with "The" (the base
    starts about one reply in six so). The effect is read exactly, from the first-token
    distribution of policy and base on every prompt, not from a noisy sample."""
    from dataclasses import replace

    from trainer_fixtures import QUESTIONS, chat_prompt

    from tuneloop.trainer.config import ComputeConfig, DPOConfig
    from tuneloop.trainer.model import build_policy, load_base_model, load_tokenizer, prepare_compute
    from tuneloop.trainer.ppo import RewardScorer, train_ppo
    from tuneloop.trainer.reward_model import build_reward_model

    device, dtype = prepare_compute(ComputeConfig())
    tok = load_tokenizer(model_dir)
    prompts = [tuple(tok(chat_prompt(q), add_special_tokens=False)["input_ids"]) for q in QUESTIONS]
    the = tok("The", add_special_tokens=False)["input_ids"][0]
    policy = build_policy(load_base_model(model_dir, device, dtype), replace(DPOConfig(), lora_dropout=0.0))
    critic = build_reward_model(model_dir, RewardConfig(), ComputeConfig(), device, dtype, tok.pad_token_id)

    def p_the(adapter: bool) -> float:
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(p[::-1]) for p in prompts], batch_first=True).flip(1)
        attn = (torch.arange(ids.shape[1]).flip(0)[None, :] < torch.tensor([len(p) for p in prompts])[:, None]).long()
        with torch.no_grad():
            if adapter:
                logits = policy(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
            else:
                with policy.disable_adapter():
                    logits = policy(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
        return float(logits[:, -1].float().softmax(-1)[:, the].mean())

    before = p_the(adapter=False)
    score = lambda seqs: torch.tensor([float(c[0] == the) for _, c in seqs])  # noqa: E731
    cfg = tiny_ppo(ppo_iterations=4, ppo_prompts_per_iteration=4, ppo_samples_per_prompt=8, ppo_max_new_tokens=3,
                   ppo_minibatch_size=16, ppo_kl_coef=0.02, ppo_missing_eos_penalty=0.0)  # fmt: skip
    result = train_ppo(policy, critic, RewardScorer(score, 0.0, 0.5), tok, prompts, cfg, reference="base",
                       device=device, dtype=dtype, progress=False)  # fmt: skip
    after = p_the(adapter=True)
    assert len(result.iterations) == 4, result.stop_reason
    # Measured 0.20 -> 0.41 (AMD EPYC, AVX2, float32); the bound leaves room for other hardware and dtypes.
    assert after > before + 0.1, (before, after, [s.score for s in result.iterations])
    kls = [s.kl_per_token for s in result.iterations]
    assert all(abs(k) < 2.0 for k in kls), kls  # moved, but still near the base
