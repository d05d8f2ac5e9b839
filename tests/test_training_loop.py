"""The shared training loop: the loss normalizer is computed once per optimizer step (the update does not depend on
the micro-batch split), masks drop positions, a custom loss with a sequence normalizer plugs in, resume is exact
(torch.equal), progress lines reach a log file, and the resume key follows the code a stage imports."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from fixtures_tokens import MODEL_PARAMS
from stages import common, lr_schedule, training
from stages.training import LoopConfig, ResumeDir, StepOutput, TokenCrossEntropy, Trainer, optimizer_step

CPU = torch.device("cpu")
VOCAB, T = 320, 16
BIG_CLIP = 1e9  # no clipping: compare raw gradients


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0):
    from model import ModelConfig, NanbeigeForCausalLM
    torch.manual_seed(seed)
    return NanbeigeForCausalLM(ModelConfig.from_params(MODEL_PARAMS))


def rows(n: int, seed: int = 1, masked: bool = True) -> dict[str, torch.Tensor]:
    """n sequences; with `masked`, row i supervises only its last T - 2i positions (rows differ in token counts)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(VOCAB, (n, T + 1), generator=g)
    mask = torch.ones(n, T, dtype=torch.bool)
    if masked:
        for i in range(n):
            mask[i, :min(2 * i, T - 1)] = False
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "mask": mask}


def split(batch: dict, size: int) -> list[dict]:
    n = batch["input_ids"].shape[0]
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


def sgd_update(micros: list[dict], loss_fn=None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Weights after one SGD step at lr 1 (w - g: the gradient itself shows) from the same init."""
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    losses, _ = optimizer_step(model, opt, micros, loss_fn or TokenCrossEntropy(), 1.0, BIG_CLIP, CPU)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses


def assert_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


# ----------------------------------------------------------------------------- normalization

def test_one_by_eight_equals_four_by_two_micro_batches():
    batch = rows(8)
    w_one, l_one = sgd_update(split(batch, 8))
    w_four, l_four = sgd_update(split(batch, 2))
    assert_close(w_one, w_four)
    assert l_one["loss"] == pytest.approx(l_four["loss"], rel=1e-6)
    # The step loss is the mean over all supervised tokens of the step: sum(mask * nll) / sum(mask).
    model = tiny_model()
    with torch.no_grad():
        nll = -model.token_logprobs(batch["input_ids"], batch["targets"])
    assert l_one["loss"] == pytest.approx((nll * batch["mask"]).sum().item() / batch["mask"].sum().item(), rel=1e-6)


def test_a_mean_of_micro_means_would_differ():
    """The invariance test has teeth: with unequal token counts, averaging per-micro means moves the update."""
    batch = rows(8)

    class MicroMean(TokenCrossEntropy):  # the classic bug: each micro normalized by its own tokens
        def __init__(self, n_micros: int):
            self.n_micros = n_micros

        def __call__(self, model, micro, totals):
            share = super().__call__(model, micro, totals)["loss"]
            return {"loss": share * totals["tokens"] / micro["mask"].sum() / self.n_micros}

    w_one, _ = sgd_update(split(batch, 8), MicroMean(1))
    w_four, _ = sgd_update(split(batch, 2), MicroMean(4))
    assert any(not torch.allclose(w_one[k], w_four[k], atol=1e-6) for k in w_one)


def test_unmasked_equal_micro_batches_give_the_mean_loss_of_pretrain():
    batch = rows(4, masked=False)
    _, losses = sgd_update(split(batch, 2))
    model = tiny_model()
    with torch.no_grad():
        means = [model.loss(m["input_ids"], m["targets"]).item() for m in split(batch, 2)]
    assert losses["loss"] == pytest.approx(sum(means) / 2, rel=1e-6)


def test_masked_positions_do_not_move_the_weights():
    batch = rows(4)
    other = dict(batch, targets=torch.where(batch["mask"], batch["targets"], (batch["targets"] + 7) % VOCAB))
    assert not torch.equal(other["targets"], batch["targets"])
    w_a, l_a = sgd_update(split(batch, 2))
    w_b, l_b = sgd_update(split(other, 2))
    assert_close(w_a, w_b, atol=0)
    assert l_a == l_b


def test_a_step_without_units_is_refused():
    batch = rows(2)
    batch["mask"][:] = False
    with pytest.raises(common.StageError, match="nothing to normalize by"):
        sgd_update(split(batch, 1))


class PairLoss(training.Loss):
    """A DPD-shaped plug-in with two normalizers: rows 2i, 2i + 1 are (chosen, rejected);
    L = 1/P sum_pairs -log sigmoid(beta (logp_chosen - logp_rejected)) + 1/N_chosen sum_{chosen tokens} -logp."""
    beta = 0.5

    def units(self, micro):
        return {"pairs": micro["input_ids"].shape[0] // 2, "chosen_tokens": int(micro["mask"][0::2].sum())}

    def __call__(self, model, micro, totals):
        logp = model.token_logprobs(micro["input_ids"], micro["targets"]) * micro["mask"]
        seq = logp.sum(-1)
        margin = self.beta * (seq[0::2] - seq[1::2])
        dpo = -torch.nn.functional.logsigmoid(margin).sum() / totals["pairs"]
        nll = -logp[0::2].sum() / totals["chosen_tokens"]
        return {"loss": dpo + nll, "dpo": dpo.detach(), "margin": margin.detach().sum() / totals["pairs"]}


def test_a_custom_loss_with_a_pair_normalizer_plugs_in():
    batch = rows(8)
    w_one, l_one = sgd_update(split(batch, 8), PairLoss())
    w_two, l_two = sgd_update(split(batch, 4), PairLoss())
    assert_close(w_one, w_two)
    assert set(l_one) == {"loss", "dpo", "margin"} and l_one["margin"] == pytest.approx(l_two["margin"], rel=1e-5)
    model = tiny_model()
    with torch.no_grad():
        logp = model.token_logprobs(batch["input_ids"], batch["targets"]) * batch["mask"]
    seq = logp.sum(-1)
    dpo = -torch.nn.functional.logsigmoid(0.5 * (seq[0::2] - seq[1::2])).mean().item()  # mean per pair
    nll = -logp[0::2].sum().item() / batch["mask"][0::2].sum().item()  # mean per chosen token
    assert l_one["dpo"] == pytest.approx(dpo, rel=1e-5) and l_one["loss"] == pytest.approx(dpo + nll, rel=1e-5)


# ----------------------------------------------------------------------------- the Trainer

class CursorBatches:
    """A resumable source: each step reads the next 4 rows of a fixed token table (state: the cursor)."""

    def __init__(self):
        self.table, self.cursor = rows(64, seed=3), 0

    def micro_batches(self, step):
        batch = {k: v[self.cursor:self.cursor + 4] for k, v in self.table.items()}
        self.cursor = (self.cursor + 4) % 64
        return split(batch, 2)

    def state_dict(self):
        return {"cursor": self.cursor}

    def load_state_dict(self, state):
        self.cursor = state["cursor"]


def make_trainer(root: Path, stream=None, loss_fn=None, every_steps: int = 2, every_s: float = 3600.0,
                 p: dict | None = None) -> Trainer:
    model = tiny_model()
    p = p or {"optimizer": "adamw", "adam_betas": [0.9, 0.95], "adam_eps": 1e-8, "weight_decay": 0.1}
    pieces = lr_schedule.warmup_decay(6, 2, 1e-2, 1e-3, "cosine")
    cfg = LoopConfig(grad_clip=1.0, checkpoint_every=4, log_every=2, progress_every_steps=every_steps,
                     progress_every_s=every_s)
    return Trainer(model, training.build_optimizer(model, p, CPU), lambda t: lr_schedule.piecewise_lr(pieces, t),
                   loss_fn or TokenCrossEntropy(), CursorBatches(), cfg, ResumeDir(root / "ckpt"),
                   common.open_live(root / "live"), CPU, desc="unit", stream=stream or io.StringIO())


@pytest.mark.parametrize("stop", [1, 3, 4], ids=["first", "mid", "at_checkpoint"])
def test_stop_and_resume_equals_the_uninterrupted_run(tmp_path, stop):
    full = make_trainer(tmp_path / "full")
    assert full.run(6)
    part = make_trainer(tmp_path / "part")
    assert not part.run(6, stop=stop) and part.state["step"] == stop
    resumed = make_trainer(tmp_path / "part")  # a fresh process: new model, optimizer and source
    assert resumed.run(6)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert resumed.batches.cursor == full.batches.cursor == 24
    assert [r["step"] for r in resumed.state["history"]] == [2, 4, 6]  # each row once, also across the resume
    assert resumed.state["loss_start"] == full.state["loss_start"] and resumed.state["loss_end"] == full.state["loss_end"]


def test_hooks_add_metrics_and_a_milestone_logs_and_saves(tmp_path):
    trainer = make_trainer(tmp_path)
    seen = []

    def after(out: StepOutput):
        out.metrics["train/custom"] = float(out.step)
        out.milestone = out.step == 3

    trainer.run(6, before_step=seen.append, after_step=after)
    assert seen == list(range(6))
    steps = [r["step"] for r in trainer.state["history"]]
    assert steps == [2, 3, 4, 6]  # log_every 2, plus the milestone at 3
    row = trainer.state["history"][1]["metrics"]
    assert row["train/custom"] == 3.0 and {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
                                           "train/tokens_seen"} <= set(row)
    assert row["train/tokens_seen"] == 3 * 4 * T
    assert (tmp_path / "live" / "plots" / "metrics" / "train" / "custom.tsv").is_file()


def test_parts_of_a_custom_loss_are_logged_per_unit(tmp_path):
    trainer = make_trainer(tmp_path, loss_fn=PairLoss())
    trainer.run(2)
    assert {"train/dpo", "train/margin"} <= set(trainer.state["history"][0]["metrics"])


def test_progress_lines_reach_a_log_file(tmp_path):
    log = tmp_path / "unit.log"
    with open(log, "w") as fh:  # what `2> {log}` gives a stage: not a TTY
        make_trainer(tmp_path, stream=fh, every_steps=2).run(6)
    lines = log.read_text().splitlines()
    assert [line.split()[2] for line in lines] == ["2/6", "4/6", "6/6"]
    assert all(line.startswith("unit step ") and " loss " in line and " tok/s " in line and " eta " in line
               for line in lines)
    with open(tmp_path / "every_s.log", "w") as fh:  # every_s 0: a line each step, whatever every_steps says
        make_trainer(tmp_path / "s", stream=fh, every_steps=100, every_s=0.0).run(3)
    assert len((tmp_path / "every_s.log").read_text().splitlines()) == 3


def test_a_tty_gets_a_bar_not_lines():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    assert isinstance(training.make_progress("x", 4, 0, 1, 1.0, Tty()), training.progress.BarProgress)
    assert isinstance(training.make_progress("x", 4, 0, 1, 1.0, io.StringIO()), training.progress.LineProgress)


# ----------------------------------------------------------------------------- optimizer and LR pieces

def test_adamw_decays_matrices_only_and_unknown_optimizers_are_refused():
    model = tiny_model()
    p = {"optimizer": "adamw", "adam_betas": [0.9, 0.95], "adam_eps": 1e-8, "weight_decay": 0.1}
    opt = training.build_optimizer(model, p, CPU)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0 and decay["foreach"]
    assert all(q.ndim == 2 for q in decay["params"]) and any(q is model.model.embed_tokens.weight
                                                               for q in no_decay["params"])
    with pytest.raises(common.StageError, match="optimizer must be one of"):
        training.build_optimizer(model, {**p, "optimizer": "lion"}, CPU)
    with pytest.raises(common.StageError, match="apex_fused_adam runs on CUDA only"):
        training.build_optimizer(model, {**p, "optimizer": "apex_fused_adam"}, CPU)


def test_warmup_decay_pieces():
    pieces = lr_schedule.warmup_decay(10, 4, 1.0, 0.1, "linear")
    table = [lr_schedule.piecewise_lr(pieces, t) for t in range(12)]
    assert table[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert table[9] == pytest.approx(0.1) and table[11] == pytest.approx(0.1)
    assert lr_schedule.warmup_decay(3, 0, 1.0, 0.5, "constant")[0].steps == 3
    with pytest.raises(common.StageError, match="lr_shape must be one of"):
        lr_schedule.warmup_decay(3, 1, 1.0, 0.5, "step")


# ----------------------------------------------------------------------------- code version

def fake_repo(root: Path) -> Path:
    for rel, text in {
        "stages/alpha.py": "import os\nfrom stages import beta\n",
        "stages/beta.py": "def f():\n    from model import gamma  # lazy\n",
        "stages/training/__init__.py": "",
        "stages/training/loop.py": "from . import util\nfrom ..beta import f\n",
        "stages/training/util.py": "import nanbeige_kernels.fast\n",
        "model/__init__.py": "",
        "model/gamma.py": "x = 1\n",
        "model/unused.py": "x = 2\n",
        "kernels/nanbeige_kernels/__init__.py": "",
        "kernels/nanbeige_kernels/fast.py": "import torch\n",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_repo_imports_follow_lazy_relative_and_kernel_imports(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "REPO", fake_repo(tmp_path))
    assert [str(p) for p in common.repo_imports("stages.alpha")] == [
        "model/__init__.py", "model/gamma.py", "stages/alpha.py", "stages/beta.py"]
    assert [str(p) for p in common.repo_imports("stages.training.loop")] == [
        "kernels/nanbeige_kernels/__init__.py", "kernels/nanbeige_kernels/fast.py", "model/__init__.py",
        "model/gamma.py", "stages/beta.py", "stages/training/__init__.py", "stages/training/loop.py",
        "stages/training/util.py"]
    with pytest.raises(common.StageError, match="not a module of this repo"):
        common.repo_imports("stages.missing")


def test_code_version_changes_with_any_imported_file_only(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "REPO", fake_repo(tmp_path))
    version = common.code_version_closure.__wrapped__  # uncached: the files change within this test
    before = version("stages.alpha")
    (tmp_path / "model" / "unused.py").write_text("x = 3\n")
    assert version("stages.alpha") == before
    (tmp_path / "model" / "gamma.py").write_text("x = 4\n")  # imported lazily, two hops away
    assert version("stages.alpha") != before


def test_run_dir_is_keyed_by_params_code_and_torch(tmp_path, monkeypatch):
    key = {"stage": {"lr": 1.0}}
    base = training.run_dir(tmp_path, key, ("stages.pretrain",))
    assert base == training.run_dir(tmp_path, key, ("stages.pretrain",))
    assert training.run_dir(tmp_path, {"stage": {"lr": 2.0}}, ("stages.pretrain",)) != base
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert training.run_dir(tmp_path, key, ("stages.pretrain",)) != base
    monkeypatch.undo()
    monkeypatch.setattr(common, "code_version_closure", lambda *modules: "edited")
    assert training.run_dir(tmp_path, key, ("stages.pretrain",)) != base
