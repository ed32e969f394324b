"""ELMo/BERT-style layer mixing: learn which hidden states of a frozen BERT a task needs.

A small BERT is built from a config with random weights (``transformers``' ``BertConfig``
and ``BertModel``; nothing is downloaded) and returns all its hidden states
(``output_hidden_states=True``: the embeddings and each layer). ``sumto.WeightedSum``
mixes them as AllenNLP's ScalarMix does, with ``layer_norm=True`` (each hidden state
normalised over the real tokens, given by the attention mask) and layer dropout
(``dropout=0.1``). The backbone stays frozen; the mix and a linear head are trained on
a toy token task: the parity of each token id, which the embedding layer carries and
the random layers above it blur.

Run: ``.venv/bin/python examples/bert_layer_mix.py [--steps N]`` (needs ``transformers``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import BertConfig, BertModel

import sumto

VOCAB = 100


def toy_batch(batch: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Token ids with padding at the end of each sequence, and the attention mask."""
    ids = torch.randint(1, VOCAB, (batch, length), generator=generator)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
    mask = torch.arange(length) < lengths.unsqueeze(1)
    return ids.masked_fill(~mask, 0), mask


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Train the layer mix and head; returns the first and last loss and the weights."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
    )
    bert = BertModel(config).eval()  # random weights from the config, frozen
    bert.requires_grad_(False)

    num_states = config.num_hidden_layers + 1  # the embeddings and every layer
    mix = sumto.WeightedSum(num_states, scale=True, layer_norm=True, dropout=0.1)
    head = nn.Linear(config.hidden_size, 2)
    optimizer = torch.optim.Adam([*mix.parameters(), *head.parameters()], lr=0.05)

    losses = []
    for _ in range(args.steps):
        ids, mask = toy_batch(16, 12, generator)
        with torch.no_grad():
            states = bert(
                input_ids=ids, attention_mask=mask.long(), output_hidden_states=True
            ).hidden_states  # 5 tensors of shape (batch, length, hidden)
        features = mix(states, layer_norm_mask=mask)  # ScalarMix with do_layer_norm
        logits = head(features)
        loss = nn.functional.cross_entropy(logits[mask], (ids[mask] % 2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    mix.eval()  # no layer dropout from here on
    weights = mix.weights.detach()
    print(f"loss: first {losses[0]:.3f}, last {losses[-1]:.3f}")
    print("layer weights", [round(w, 3) for w in weights.tolist()], f"sum={weights.sum():.6f}")
    return {"first_loss": losses[0], "last_loss": losses[-1], "weights": weights}


if __name__ == "__main__":
    main()
