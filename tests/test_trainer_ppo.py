"""PPO on the real model: the per-token layout it trains on; PPO iterations against a trained
reward model raising its reward with bounded KL; and a sidecar round (`--algo ppo`) against a
reward model trained in the same round, published as a policy the server then serves and names
on its responses."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry
from test_trainer_reward import mixed_feedback
from trainer_fixtures import QUESTIONS, chat_prompt, tiny_config

from tuneloop.server.registry import AdapterRegistry
from tuneloop.trainer.config import ComputeConfig, DPOConfig, GateConfig, PPOConfig, RewardConfig, SidecarConfig
from tuneloop.trainer.gate import evaluate_samples, sample_completions
from tuneloop.trainer.metrics import TrainerMetrics
from tuneloop.trainer.model import autocast, build_policy, load_base_model, load_tokenizer, prepare_compute
from tuneloop.trainer.ppo import RewardScorer, completion_grid, train_ppo
from tuneloop.trainer.reward_gate import auc
from tuneloop.trainer.reward_model import (
    Encoder,
    PairItem,
    RewardHeads,
    build_reward_model,
    reward_scores,
    train_reward_model,
)
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


def test_ppo_against_a_trained_reward_model_raises_the_reward_with_bounded_kl(model_dir: Path) -> None:
    """A reward model trained on a synthetic preference over the base model's own replies (users
    prefer a reply that opens with "The", which the base does about one reply in five), then PPO
    against it on the real model. The reward model's mean score rises on seeded held-out samples of
    policy against base, and the policy's probability of opening with "The" (read exactly from the
    first-token distribution on every prompt, not from a sample) rises, while KL per token stays
    small."""
    device, dtype = prepare_compute(ComputeConfig())
    tok = load_tokenizer(model_dir)
    pad = tok.pad_token_id
    the = tok("The", add_special_tokens=False)["input_ids"][0]
    rc = RewardConfig(reward_epochs=2, reward_batch_size=8, reward_learning_rate=1e-3, reward_max_prompt_tokens=48,
                      reward_max_completion_tokens=4)  # fmt: skip
    prompts = [Encoder(tok, rc).prompt(chat_prompt(q)) for q in QUESTIONS]
    policy = build_policy(load_base_model(model_dir, device, dtype), replace(DPOConfig(), lora_dropout=0.0))
    kw: dict[str, Any] = dict(mode="base", n=16, max_new_tokens=4, temperature=1.0, device=device, dtype=dtype)
    liked = lambda c: bool(c) and c[0] == the  # noqa: E731
    train, held = (sample_completions(policy, tok, prompts, seed=s, **kw) for s in (1, 2))
    items = []
    for p in prompts:  # each opening with "The" against up to three others, per prompt
        good = [c for q, c in train if q == p and liked(c)]
        other = [c for q, c in train if q == p and not liked(c)]
        items += [PairItem(p, good[j % len(good)], other[j], 0.0) for j in range(min(3 * len(good), len(other)))]
    assert len(items) >= 16, len(items)
    rm = build_reward_model(model_dir, rc, ComputeConfig(), device, dtype, pad)
    train_reward_model(rm, items, RewardHeads(), rc, pad_id=pad, device=device, dtype=dtype, progress=False)
    score = lambda seqs: reward_scores(rm, seqs, pad_id=pad, device=device, dtype=dtype)  # noqa: E731
    held_auc = auc(score(held).tolist(), [liked(c) for _, c in held])
    assert held_auc is not None and held_auc > 0.75, held_auc  # measured 0.92: it learned the opener
    raw = score([(it.prompt, it.chosen) for it in items] + [(it.prompt, it.rejected) for it in items])
    scorer = RewardScorer(score, float(raw.mean()), float(raw.std()))
    # A fresh value head (a round starts the critic from the reward model; either is a critic).
    critic = build_reward_model(model_dir, rc, ComputeConfig(), device, dtype, pad)

    def p_the(adapter: bool) -> float:
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(p[::-1]) for p in prompts], batch_first=True).flip(1)
        attn = (torch.arange(ids.shape[1]).flip(0)[None, :] < torch.tensor([len(p) for p in prompts])[:, None]).long()
        with torch.no_grad(), autocast(device, dtype):  # bf16 weights where the host computes in bf16
            if adapter:
                logits = policy(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
            else:
                with policy.disable_adapter():
                    logits = policy(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
        return float(logits[:, -1].float().softmax(-1)[:, the].mean())

    before = p_the(adapter=False)
    cfg = tiny_ppo(ppo_iterations=6, ppo_prompts_per_iteration=4, ppo_samples_per_prompt=8, ppo_max_new_tokens=4,
                   ppo_minibatch_size=16, ppo_kl_coef=0.02, ppo_missing_eos_penalty=0.0)  # fmt: skip
    result = train_ppo(policy, critic, scorer, tok, prompts, cfg, reference="base", device=device, dtype=dtype,
                       progress=False)  # fmt: skip
    after = p_the(adapter=True)
    assert len(result.iterations) == 6, result.stop_reason
    # Measured 0.20 -> 0.29, reward gain +0.24, KL/token <= 0.10 (AMD EPYC, AVX2, float32); fewer
    # reward-model pairs (12 samples per prompt) left it flat: the bound is what this data supports.
    assert after > before + 0.05, (before, after, [s.score for s in result.iterations])
    # The gate's own measure: the reward model's score of policy samples against base samples,
    # seeded, on every prompt.
    gate = GateConfig(eval_prompts=len(prompts), samples_per_prompt=8, sample_max_tokens=4)
    _, samples = evaluate_samples(policy, tok, prompts, gate, reference="base", seed=7, device=device, dtype=dtype)
    gain = float(scorer.score(samples.candidate).mean() - scorer.score(samples.reference).mean())
    assert gain > 0, (gain, before, after)
    kls = [s.kl_per_token for s in result.iterations]
    assert all(abs(k) < 2.0 for k in kls), kls  # moved, but still near the base
