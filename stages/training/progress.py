"""The progress piece: a tqdm bar on a terminal; off one (every rule writes `2> {log}`, where tqdm disables itself)
a flushed line every `every_steps` optimizer steps or `every_s` seconds, whichever comes first, and at the last
step, so `tail -f logs/<scale>/<stage>.log` shows where a run is:

    pretrain step 120/400 (30.0%) loss 3.2140 tok/s 12,345 elapsed 0:01:02 eta 0:02:25
"""
from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import TextIO


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class LineProgress:
    """Lines for a log file. ETA = remaining steps x the mean wall time per step of this process so far."""

    def __init__(self, desc: str, total: int, initial: int, every_steps: int, every_s: float, stream: TextIO):
        self.desc, self.total, self.initial = desc, total, initial
        self.every_steps, self.every_s, self.stream = every_steps, every_s, stream
        self.began = self.last_time = time.perf_counter()
        self.last_step, self.tokens = initial, 0

    def update(self, step: int, loss: float, tokens: int) -> None:
        """After optimizer step `step` (1-based) of `tokens` tokens with loss `loss`."""
        self.tokens += tokens
        now = time.perf_counter()
        if not (step - self.last_step >= self.every_steps or now - self.last_time >= self.every_s
                or step == self.total):
            return
        per_step = (now - self.began) / max(step - self.initial, 1)
        tps = self.tokens / max(now - self.last_time, 1e-9)
        self.stream.write(f"{self.desc} step {step}/{self.total} ({100 * step / self.total:.1f}%) loss {loss:.4f} "
                          f"tok/s {tps:,.0f} elapsed {_clock(now - self.began)} "
                          f"eta {_clock(per_step * (self.total - step))}\n")
        self.stream.flush()
        self.last_step, self.last_time, self.tokens = step, now, 0

    def close(self) -> None:
        self.stream.flush()


class BarProgress:
    """A tqdm bar with the loss and tokens/s as its postfix."""

    def __init__(self, desc: str, total: int, initial: int, stream: TextIO):
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", file=stream)
        self.last_time, self.tokens = time.perf_counter(), 0

    def update(self, step: int, loss: float, tokens: int) -> None:
        self.tokens += tokens
        now = time.perf_counter()
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{self.tokens / max(now - self.last_time, 1e-9):,.0f}",
                             refresh=False)
        self.last_time, self.tokens = now, 0

    def close(self) -> None:
        self.bar.close()


def make_progress(desc: str, total: int, initial: int, every_steps: int, every_s: float,
                  stream: TextIO | None = None) -> LineProgress | BarProgress:
    """BarProgress on a TTY, LineProgress otherwise (stream: stderr by default)."""
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        return BarProgress(desc, total, initial, stream)
    return LineProgress(desc, total, initial, int(every_steps), float(every_s), stream)
