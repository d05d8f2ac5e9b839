"""Documents for the filter / dedup tests: ingest-schema shards built from lists of texts, and crafted texts."""
from __future__ import annotations

import math
import random
from pathlib import Path

import pyarrow as pa

from stages import common

DOC_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("domain", pa.string()), ("text", pa.string()),
                        ("n_chars", pa.int64()), ("approx_tokens", pa.int64())])


def write_ingest_shard(path: str | Path, texts: list[str], domains: list[str] | None = None) -> Path:
    """An ingest shard (the document schema) holding `texts`, domain web unless given."""
    domains = domains or ["web"] * len(texts)
    rows = [{"id": common.content_id(t), "source": Path(path).stem, "domain": d, "text": t, "n_chars": len(t),
             "approx_tokens": math.ceil(len(t.encode("utf-8")) / 4)} for t, d in zip(texts, domains)]
    common.write_table(path, common.rows_to_table(rows, DOC_SCHEMA))
    return Path(path)


def word_salad(rng: random.Random, n_words: int, vocab_size: int = 5000) -> str:
    """Distinct-looking documents for dedup: 12-word lines of pseudo-words, each line ending with a period."""
    words = [f"w{rng.randrange(vocab_size)}" for _ in range(n_words)]
    return "\n".join(" ".join(words[i: i + 12]) + "." for i in range(0, n_words, 12))


CLEAN_PROSE = """The history of the printing press shows how a single technical change can reshape a whole society.
Before movable type, books were copied by hand, which made them rare and expensive, and only a small part of the
population could afford to own one.
When Gutenberg combined metal type with an oil-based ink and a modified wine press, the cost of producing a page
fell sharply, and printers in many European cities began to publish grammars, calendars, and religious texts.
Historians still argue about how quickly literacy rose as a result, but most agree that the new abundance of
printed material helped scholars compare sources, correct errors, and share discoveries with colleagues far away.
"""

CLEAN_CODE = '''import json
from pathlib import Path


def load_config(path: str) -> dict:
    """Read a JSON config file and fill in defaults for missing keys."""
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    defaults = {"batch_size": 32, "learning_rate": 3e-4, "epochs": 10}
    for key, value in defaults.items():
        config.setdefault(key, value)
    return config


class Trainer:
    def __init__(self, config: dict):
        self.config = config
        self.history = {"loss": [], "accuracy": []}

    def log(self, loss: float, accuracy: float) -> None:
        self.history["loss"].append(loss)
        self.history["accuracy"].append(accuracy)
        print(f"loss={loss:.4f} accuracy={accuracy:.3f}")


if __name__ == "__main__":
    trainer = Trainer(load_config(str(Path("config.json"))))
    trainer.log(0.5, 0.8)
'''

FRENCH = """La Révolution française est une période de bouleversements politiques et sociaux en France, qui commence
en 1789 et se termine en 1799. Elle met fin à la monarchie absolue et proclame les droits de l'homme et du citoyen.
Les historiens considèrent souvent cette période comme le début de l'époque contemporaine en Europe, car elle a
profondément transformé les institutions, la société et la culture du pays tout entier."""

GERMAN = """Die Geschichte der Stadt reicht bis in die Römerzeit zurück, als an der Stelle des heutigen Marktplatzes
ein kleines Lager errichtet wurde. Im Mittelalter wuchs die Siedlung zu einem bedeutenden Handelszentrum heran,
und die Bürger bauten eine mächtige Stadtmauer, deren Reste man noch heute besichtigen kann. Später wurde die
Stadt durch die Industrialisierung geprägt, und viele Menschen zogen vom Land in die neuen Fabriken."""

CHINESE = """长城是中国古代的军事防御工程，它的修筑历史可以追溯到西周时期。秦始皇统一六国以后，把各国原有的长城连接起来，
形成了万里长城。明朝时期又对长城进行了大规模的修建，我们今天看到的长城大多是明代修建的。长城不仅是重要的历史遗迹，
也是中华民族的象征之一，每年都有大量的游客从世界各地来到这里参观游览。"""


# Distinct sentences of prose, one per line: the unit the line-level rules count.
PROSE_LINES = [
    "Early settlers chose the valley because the river offered fresh water and fertile soil.",
    "Within a generation the village had a mill, a school, and a market held every Thursday.",
    "Merchants from the coast brought salt and cloth, and they returned home with grain and wool.",
    "A stone bridge replaced the old wooden crossing after a flood destroyed it in a hard spring.",
    "The parish records describe long winters, poor harvests, and several outbreaks of fever.",
    "Children learned to read from a single battered primer that passed from family to family.",
    "When the railway arrived, the quiet market town suddenly found itself connected to the capital.",
    "Factories opened near the station, and workers moved into rows of narrow brick houses.",
    "Today the mill is a museum where visitors can watch the great wheel turn in the current.",
    "Local historians continue to collect letters and photographs that tell the story of the valley.",
]
