"""How often the trained fixture's MTP head agrees with its main head: the acceptance rate that decides
whether speculative decoding with Qwen3.5's own MTP head can pay on a CPU (the mtp issue).

At each held-out position t the main model predicts token t+1. The MTP head sees the main model's
final hidden state at t and the embedding of token t+1, and predicts token t+2; the main model
predicts the same token one step later, from t+1. With greedy decoding a one-token draft is accepted
exactly when the two argmaxes agree, so their agreement over held-out text is the acceptance rate.
Both run in PyTorch (fp32) from the checkpoint's own weights, as onnxruntime-genai's ``mtp.onnx``
takes them (``edgekit.fixtures.trained`` trains the head that way).

Prints JSON: positions, acceptance (argmax agreement), the MTP head's own next-next-token accuracy
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


def mtp_head(folder: Path, config: object) -> torch.nn.ModuleDict:
    """The MTP layer and its fc and norms, with the checkpoint's ``mtp.*`` weights."""
    from safetensors.torch import load_file
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer, Qwen3_5RMSNorm

    hidden, eps = config.hidden_size, config.rms_norm_eps  # type: ignore[attr-defined]
    head = torch.nn.ModuleDict({
        "fc": torch.nn.Linear(2 * hidden, hidden, bias=False),
        "norm_embedding": Qwen3_5RMSNorm(hidden, eps=eps),
        "norm_hidden": Qwen3_5RMSNorm(hidden, eps=eps),
        "layer": Qwen3_5DecoderLayer(config, layer_idx=config.layer_types.index("full_attention")),  # type: ignore[attr-defined]
        "norm": Qwen3_5RMSNorm(hidden, eps=eps),
    })
    names = {"fc.weight": "mtp.fc.weight", "norm_embedding.weight": "mtp.pre_fc_norm_embedding.weight",
             "norm_hidden.weight": "mtp.pre_fc_norm_hidden.weight", "norm.weight": "mtp.norm.weight"}
    weights = {k: v.float() for k, v in load_file(folder / "model.safetensors").items() if k.startswith("mtp.")}
    state = {ours: weights[theirs] for ours, theirs in names.items()}
    state |= {f"layer.{k[len('mtp.layers.0.'):]}": v for k, v in weights.items() if k.startswith("mtp.layers.0.")}
    head.load_state_dict(state)
    return head.eval()


@click.command()
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path), default=Path("fixtures/qwen3.5-trained"))
@click.option("--rows", type=click.IntRange(1), default=16, show_default=True, help="Held-out windows of 256 tokens.")
def main(model: Path, rows: int) -> None:
    """Measure the MTP head's acceptance rate on MODEL's held-out text."""
    from transformers import AutoConfig, Qwen3_5ForCausalLM
    from transformers.masking_utils import create_causal_mask

    torch.set_num_threads(2)
    config = AutoConfig.from_pretrained(model).text_config
    main_model = Qwen3_5ForCausalLM.from_pretrained(model, config=config, dtype=torch.float32).eval()
    head = mtp_head(model, config)
    windows = trained.held_out_rows(256)[:rows]
    agree = mtp_right = main_right = positions = 0
    with torch.inference_mode():
        for row in windows:
            ids = row[None]
            out = main_model(input_ids=ids, output_hidden_states=True)
            hidden, main_next = out.hidden_states[-1], out.logits[0].argmax(-1)  # main_next[t] predicts t+1
            embeds = main_model.model.embed_tokens(ids[:, 1:])
            x = head["fc"](torch.cat([head["norm_embedding"](embeds), head["norm_hidden"](hidden[:, :-1])], dim=-1))
            where = torch.arange(x.shape[1])[None]
            rotary = main_model.model.rotary_emb(x, where[None].expand(3, -1, -1))
            mask = create_causal_mask(config=config, inputs_embeds=x, attention_mask=None, cache=None, position_ids=where)
            x = head["norm"](head["layer"](x, position_embeddings=rotary, attention_mask=mask, position_ids=where))
            draft = (x[0] @ main_model.model.embed_tokens.weight.T).argmax(-1)  # draft[t] predicts t+2
            # Positions t = 0..S-3: the draft for t+2 against the main head's own prediction from t+1.
            verified, truth = main_next[1:-1], row[2:]
            draft = draft[:-1]
            agree += int((draft == verified).sum())
            mtp_right += int((draft == truth).sum())
            main_right += int((verified == truth).sum())
            positions += len(truth)
    click.echo(json.dumps({"positions": positions, "acceptance": agree / positions, "mtp_accuracy": mtp_right / positions,
                           "main_accuracy": main_right / positions}, indent=2))


if __name__ == "__main__":
    main()
