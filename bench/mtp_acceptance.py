"""How often the trained fixture's MTP head agrees with its main head: the acceptance rate that decides
whether speculative decoding with Qwen3.5's own MTP head can pay on a CPU (the mtp issue).

At each held-out position t the main model predicts token t+1. The MTP head sees the main model's
final hidden state at t and the embedding of token t+1, and predicts token t+2; the main model
predicts the same token one step later, from t+1. With greedy decoding a one-token draft is accepted
exactly when the two argmaxes agree, so their agreement over held-out text is the acceptance rate.
Both run in PyTorch (fp32) from the checkpoint's own weights, in the module that trained them
(``edgekit.fixtures.trained``), which feeds the head as onnxruntime-genai's ``mtp.onnx`` takes it.

Under sampling (``--temperature``, ``--top-k``, ``--top-p``) the engine accepts a draft when the
sampler draws it from the main model's distribution (edgekit.runtime.speculative), so a position's
acceptance is the probability that distribution gives the draft: the expected rate, not one draw's.

``--draft-rows N`` lets the draft choose among the first N token ids only: the cut draft head that
bench/mtp_cost.py times. Ids follow the tokenizer's merge order, so the first ones are roughly the most
frequent; a token past N is never drafted, and a draft that would have been it is lost.

Prints JSON: the draft's rows, the sampling settings, positions, acceptance, the MTP head's own
next-next-token accuracy and the main head's next-token accuracy on the same positions.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))

from edgekit.fixtures import trained  # noqa: E402
from edgekit.runtime.sampling import Sampler, Sampling  # noqa: E402


@click.command()
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path), default=Path("fixtures/qwen3.5-trained"))
@click.option("--rows", type=click.IntRange(1), default=16, show_default=True, help="Held-out windows of 256 tokens.")
@click.option("--draft-rows", type=click.IntRange(1), default=None,
              help="Cut the draft's LM head to the first N token ids, as bench/mtp_cost.py times it (default: all).")
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True)
@click.option("--top-p", type=click.FloatRange(0, 1), default=1.0, show_default=True)
@click.option("--save", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write each position's acceptance probability and draft confidence (for bench/mtp_cost.py --replay).")
def main(model: Path, rows: int, draft_rows: int | None, temperature: float, top_k: int, top_p: float,
         save: Path | None) -> None:
    """Measure the MTP head's acceptance rate on MODEL's held-out text.

    \b
    Example:
      python bench/mtp_acceptance.py --draft-rows 16384 --temperature 0.7 --top-k 20 --top-p 0.8
    """
    torch.set_num_threads(2)
    module = trained.load(model)
    embedding = module.model.embed_tokens.weight
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    sampler = Sampler(sampling)
    chances: list[float] = []  # per position: the probability that the draft is accepted
    confidence: list[float] = []  # per position: the draft head's own probability for its draft
    agree = mtp_right = main_right = positions = 0
    with torch.inference_mode():
        for row in trained.held_out_rows(256)[:rows]:
            hidden, mtp = module.hidden_states(row[None], mtp_rows=1)
            main_logits = hidden[0] @ embedding.T  # main_logits[t] predicts t+1
            main_next = main_logits.argmax(-1)
            draft_logits = mtp[0] @ embedding[:draft_rows].T
            draft = draft_logits.argmax(-1)  # draft[t] predicts t+2
            confidence += torch.softmax(draft_logits, -1).amax(-1)[:-1].tolist()
            # Positions t = 0..S-3: the draft for t+2 against the main head's own prediction from t+1.
            verified, truth, draft = main_next[1:-1], row[2:], draft[:-1]
            agree += int((draft == verified).sum())
            for logits, guess in zip(main_logits[1:-1].numpy(), draft.tolist()):
                order, probs = sampler.distribution(logits)
                chances.append(float(probs[order == guess].sum()))
            mtp_right += int((draft == truth).sum())
            main_right += int((verified == truth).sum())
            positions += len(truth)
    if save:
        save.write_text(json.dumps({"sampling": asdict(sampling), "positions": list(zip(chances, confidence))}))
    click.echo(json.dumps({"draft_rows": draft_rows or embedding.shape[0], "sampling": asdict(sampling),
                           "positions": positions, "acceptance": sum(chances) / positions,
                           "by_draft_confidence": _by_confidence(chances, confidence),
                           "greedy_agreement": agree / positions, "mtp_accuracy": mtp_right / positions,
                           "main_accuracy": main_right / positions}, indent=2))


def _by_confidence(chances: list[float], confidence: list[float]) -> list[dict[str, float]]:
    """For drafting only where the draft head gives its draft at least ``p_min``: the share of
    positions drafted and the acceptance among them."""
    rows = []
    for p_min in (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        kept = [c for c, q in zip(chances, confidence) if q >= p_min]
        rows.append({"p_min": p_min, "drafted": len(kept) / len(chances),
                     "acceptance": sum(kept) / len(kept) if kept else None})
    return rows


if __name__ == "__main__":
    main()
