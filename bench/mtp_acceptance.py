"""How often the trained fixture's MTP head agrees with its main head: the acceptance rate that decides
whether speculative decoding with Qwen3.5's own MTP head can pay on a CPU (the mtp issue).

At each held-out position t the main model predicts token t+1. The MTP head sees the main model's
final hidden state at t and the embedding of token t+1, and predicts token t+2; the main model
predicts the same token one step later, from t+1. With greedy decoding a one-token draft is accepted
exactly when the two argmaxes agree, so their agreement over held-out text is the acceptance rate.
Both run in PyTorch (fp32) from the checkpoint's own weights, in the module that trained them
(``edgekit.fixtures.trained``), which feeds the head as onnxruntime-genai's ``mtp.onnx`` takes it.

``--draft-rows N`` lets the draft choose among the first N token ids only: the cut draft head that
bench/mtp_cost.py times. Ids follow the tokenizer's merge order, so the first ones are roughly the most
frequent; a token past N is never drafted, and a draft that would have been it is lost.

Prints JSON: the draft's rows, positions, acceptance (argmax agreement), the MTP head's own next-next-token accuracy
and the main head's next-token accuracy on the same positions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))

from edgekit.fixtures import trained  # noqa: E402


@click.command()
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path), default=Path("fixtures/qwen3.5-trained"))
@click.option("--rows", type=click.IntRange(1), default=16, show_default=True, help="Held-out windows of 256 tokens.")
@click.option("--draft-rows", type=click.IntRange(1), default=None,
              help="Cut the draft's LM head to the first N token ids, as bench/mtp_cost.py times it (default: all).")
def main(model: Path, rows: int, draft_rows: int | None) -> None:
    """Measure the MTP head's acceptance rate on MODEL's held-out text."""
    torch.set_num_threads(2)
    module = trained.load(model)
    embedding = module.model.embed_tokens.weight
    agree = mtp_right = main_right = positions = 0
    with torch.inference_mode():
        for row in trained.held_out_rows(256)[:rows]:
            hidden, mtp = module.hidden_states(row[None], mtp_rows=1)
            main_next = (hidden[0] @ embedding.T).argmax(-1)  # main_next[t] predicts t+1
            draft = (mtp[0] @ embedding[:draft_rows].T).argmax(-1)  # draft[t] predicts t+2
            # Positions t = 0..S-3: the draft for t+2 against the main head's own prediction from t+1.
            verified, truth, draft = main_next[1:-1], row[2:], draft[:-1]
            agree += int((draft == verified).sum())
            mtp_right += int((draft == truth).sum())
            main_right += int((verified == truth).sum())
            positions += len(truth)
    click.echo(json.dumps({"draft_rows": draft_rows or embedding.shape[0], "positions": positions,
                           "acceptance": agree / positions, "mtp_accuracy": mtp_right / positions,
                           "main_accuracy": main_right / positions}, indent=2))


if __name__ == "__main__":
    main()
