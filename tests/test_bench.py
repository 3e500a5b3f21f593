import json

import torch

from tiedlm.bench import naive_step, training_flops_per_token
from tiedlm.cli import main
from tiedlm.config import Config, load_config
from tiedlm.models.lstm import NaiveLSTM


def test_bench_json_has_the_documented_fields(capsys, config_file):
    code = main(["bench", str(config_file), "--windows", "3", "--warmup", "1", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    for key in (
        "train_tokens_per_s",
        "eval_tokens_per_s",
        "reference_train_tokens_per_s",
        "peak_memory_mb",
        "precision",
        "device",
        "speedup_over_reference",
        "fraction_of_peak",
        "cpu_features",
        "bf16",
    ):
        assert key in report, key
    assert report["train_tokens_per_s"] > 0 and report["reference_train_tokens_per_s"] > 0
    assert report["matmul_peak_gflops"]["fp32"] > 0 and report["precision"] == "fp32"


def test_flop_count_of_the_small_model():
    config = Config()  # 200 units, 2 layers
    plain = training_flops_per_token(config, 10_000, unique_fraction=0.5)
    assert plain == 3 * (2 * 2 * 800 * 400 + 2 * 200 * 10_000)
    config.loss.augmented, config.loss.detach_target = True, True
    target_side = 0.5 * 2 * 200 * 10_000  # ỹ for the unique targets
    assert training_flops_per_token(config, 10_000, 0.5) == plain + target_side  # 700 x 10k: one kept block
    config.loss.detach_target = False
    assert training_flops_per_token(config, 10_000, 0.5) == plain + 3 * target_side  # + the gradient into L
    big = training_flops_per_token(config, 100_000, 0.5)  # 700 x 100k exceeds a block: recomputed
    assert big == 3 * (2 * 2 * 800 * 400 + 2 * 200 * 100_000) + 4 * 0.5 * 2 * 200 * 100_000


def test_naive_reference_computes_the_same_loss_as_tiedlm(config_file):
    # The reference is only a fair baseline if it optimises the same objective.
    from tiedlm.loss import AugmentedLoss

    config = load_config(config_file, ["train.clip=0"])  # compare raw gradients
    torch.manual_seed(0)
    naive = NaiveLSTM(config, 31).eval()
    tokens = torch.randint(0, 31, (6, 4))
    targets = torch.randint(0, 31, (6, 4))
    state = (torch.zeros(2, 4, 12), torch.zeros(2, 4, 12))
    optimizer = torch.optim.SGD(naive.parameters(), lr=0.0)
    before = {k: v.clone() for k, v in naive.state_dict().items()}
    naive_step(naive, optimizer, config, tokens, targets, state)  # dropout off: the model is in eval mode
    assert all(torch.equal(before[k], v) for k, v in naive.state_dict().items())  # lr 0: no change
    grads = {n: p.grad.clone() for n, p in naive.named_parameters()}
    naive.zero_grad()
    logits, _ = naive(tokens, state)
    loss_fn = AugmentedLoss(config.loss.tau, config.loss.gamma)
    ours = loss_fn(logits.flatten(0, 1), targets.flatten(), naive.embedding.weight).sum()
    (ours / config.data.batch_size).backward()
    for name, parameter in naive.named_parameters():
        torch.testing.assert_close(parameter.grad, grads[name], rtol=1e-4, atol=1e-6)


def test_allocator_tuning_applies_on_linux_glibc():
    import platform
    import sys

    from tiedlm.runtime import tune_allocator

    applied = tune_allocator()
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert applied is True
    else:
        assert applied is False


def test_frozen_heap_keeps_the_set_up_out_of_the_collector_until_exit():
    import gc

    from tiedlm.runtime import frozen_heap

    before = gc.get_freeze_count()
    alive = [object() for _ in range(10)]
    with frozen_heap():
        assert gc.get_freeze_count() >= before + len(alive)
    assert gc.get_freeze_count() == 0  # unfrozen again: a library caller's heap is left as it was


def test_training_runs_with_the_heap_frozen(tmp_path, monkeypatch):
    """The trainer's epochs run under frozen_heap (tiedlm.runtime says why)."""
    import gc

    from tiedlm.testing import write_config, write_corpus
    from tiedlm.training import loop

    counts = []
    original = loop.Trainer._run_epoch

    def run_epoch(self):
        counts.append(gc.get_freeze_count())
        return original(self)

    monkeypatch.setattr(loop.Trainer, "_run_epoch", run_epoch)
    from tiedlm.config import load_config

    path = write_config(tmp_path / "c.toml", write_corpus(tmp_path))
    config = load_config(path, ["train.max_epochs=1", "train.max_steps_per_epoch=2"])
    loop.Trainer(config, tmp_path / "run", echo=lambda *a, **k: None).fit()
    assert counts and all(count > 1000 for count in counts) and gc.get_freeze_count() == 0


def test_bench_runs_the_rhn_against_its_naive_loop(tmp_path, corpus_dir, capsys):
    from test_rhn import write_rhn_config

    config = write_rhn_config(tmp_path / "rhn.toml", corpus_dir)
    assert main(["bench", str(config), "--windows", "2", "--warmup", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["architecture"] == "rhn" and report["reference_train_tokens_per_s"] > 0
    model = load_config(config).model
    h, v = model.hidden_size, report["vocab_size"]
    flops = 3 * (2 * 2 * h * h * (1 + model.depth) + 2 * h * v)  # + the AL target side, which depends on the batch
    assert report["train_gflop_per_token"] * 1e9 >= flops


def test_bf16_peak_is_timed_briefly_where_bf16_is_emulated(monkeypatch):
    # An AVX2-only CPU emulates bf16 ~50x slower than fp32: the bench must not sit for minutes on
    # a 2048² bf16 product there. It times a small one within a fixed budget instead.
    from tiedlm import bench

    calls = []
    monkeypatch.setattr(bench, "matmul_peak_gflops", lambda dtype, device, **kw: calls.append((dtype, kw)) or 1.0)
    for native in (True, False):
        calls.clear()
        monkeypatch.setattr(bench, "bf16_native", lambda device, native=native: (native, "test"))
        peaks, kind = bench.matmul_peaks(torch.device("cpu"))
        assert kind == ("native" if native else "emulated") and set(peaks) == {"fp32", "bf16"}
        budgets = {dtype: kw.get("budget_s") for dtype, kw in calls}
        assert budgets[torch.float32] is None
        assert budgets[torch.bfloat16] == (None if native else bench.EMULATED_BF16_BUDGET_S)


def test_a_peak_with_a_budget_shrinks_its_product(monkeypatch):
    from tiedlm import bench

    sizes, original = [], torch.randn
    monkeypatch.setattr(torch, "randn", lambda *shape, **kw: sizes.append(shape) or original(*shape, **kw))
    assert bench.matmul_peak_gflops(torch.float32, torch.device("cpu"), budget_s=1e-6) > 0
    assert max(shape[0] for shape in sizes) == 256  # the smallest product, however fast the machine


def test_report_names_the_cpu_features_and_emulated_bf16():
    from tiedlm.bench import format_report

    report = {"config": "c", "device": "cpu", "cpu_features": "AVX2, no avx512_bf16/amx (bf16 emulated)",
              "bf16": "emulated", "threads": 2, "precision": "fp32", "dropout_mode": "exact", "augmented": False,
              "train_tokens_per_s": 1.0, "achieved_gflops": 1.0, "fraction_of_peak": 0.5,
              "matmul_peak_gflops": {"fp32": 2.0, "bf16": 0.1}, "eval_tokens_per_s": 1.0, "eval_batch_size": 10,
              "peak_memory_mb": 1.0}  # fmt: skip
    text = format_report(report)
    assert "AVX2, no avx512_bf16/amx" in text and "bf16: emulated" in text
