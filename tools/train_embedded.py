"""Train the embedded StarCoder2 stand-in: tokenizer, then model. `make embedded-model` runs this
(`python -m tools.train_embedded`); it is a maintainer tool, not part of the installed package.

Reproducible: fixed seeds, a fixed step count, data from `tools.corpus` (files present on
a fresh machine). Writes an HF directory (bf16 safetensors, tokenizer) plus
`training.json` with the hyper-parameters, timings, losses and the sha256 of every
training file (tests use it to prove calibration/evaluation text was never trained on).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sc2quant.core.tokens import EOS, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, SPECIAL_TOKENS
from sc2quant.embedded import EMBEDDED_MODEL_DIR
from tools.corpus import iter_files

MODEL_SHAPE = dict(
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    sliding_window=256,  # smaller than the context, so windowing is exercised everywhere
    rope_theta=100_000.0,
)
VOCAB_SIZE = 8192
CHUNK_CHARS = 1600  # ~450 tokens: a FIM example fits in one training sequence
FIM_RATE = 0.5  # StarCoder's rate; PSM format


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE like StarCoder2's (digits split individually), StarCoder2 special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t != EOS],
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


def fim_transform(chunk: str, rng: random.Random) -> str:
    """Prefix-Suffix-Middle on a random character span, as StarCoder trains."""
    if rng.random() >= FIM_RATE or len(chunk) < 10:
        return chunk
    a, b = sorted(rng.sample(range(len(chunk) + 1), 2))
    return f"{FIM_PREFIX}{chunk[:a]}{FIM_SUFFIX}{chunk[b:]}{FIM_MIDDLE}{chunk[a:b]}"


def chunk_text(text: str) -> list[str]:
    """Split at line boundaries into pieces of about CHUNK_CHARS."""
    out, cur = [], ""
    for line in text.splitlines(keepends=True):
        if cur and len(cur) + len(line) > CHUNK_CHARS:
            out.append(cur)
            cur = ""
        cur += line
    if cur:
        out.append(cur)
    return out


def pack(tokenizer, texts: list[str], seq_len: int, seed: int) -> torch.Tensor:
    """FIM-transform chunks, join with <|endoftext|>, and cut into [n, seq_len] sequences."""
    rng = random.Random(seed)
    docs = [fim_transform(c, rng) + EOS for t in texts for c in chunk_text(t)]
    rng.shuffle(docs)
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def build_model(vocab_size: int, eos_id: int):
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    shape = dict(MODEL_SHAPE)
    rope_theta = shape.pop("rope_theta")
    config = Starcoder2Config(
        vocab_size=vocab_size,
        **shape,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        hidden_act="gelu_pytorch_tanh",
        use_bias=True,
        norm_epsilon=1e-5,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        residual_dropout=0.0,
        embedding_dropout=0.0,
        attention_dropout=0.0,
    )
    return Starcoder2ForCausalLM(config)


@torch.no_grad()
def perplexity(model, data: torch.Tensor, batch: int = 8) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch):
        x = data[i : i + batch]
        logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += x[:, 1:].numel()
    model.train()
    return math.exp(total / count)


MODEL_CARD = """# sc2quant embedded StarCoder2 (stand-in)

**What it is:** a small `Starcoder2ForCausalLM` trained from scratch by `make embedded-model`
(`tools/train_embedded.py`) so that every sc2quant command works offline and accuracy
drift can be measured on a really trained model. It has the real family's features: grouped
KV heads, rotary embeddings, LayerNorm with bias, biased linears, `gelu_pytorch_tanh` MLP,
tied embeddings, and a sliding window smaller than the context.

**What it is not:** a useful code assistant. It writes code-looking text, not correct programs.

| | |
|---|---|
| shape | {num_hidden_layers} layers, hidden {hidden_size}, {num_attention_heads} heads / {num_key_value_heads} KV heads, \
intermediate {intermediate_size} |
| context / sliding window | {max_position_embeddings} / {sliding_window} |
| vocabulary | {vocab_size} byte-level BPE (digits split), StarCoder2's 38 special tokens |
| parameters | {parameters:,} (bf16 safetensors, {megabytes:.1f} MB) |
| data | {train_files} files: CPython stdlib + C headers (PSF), PyTorch c10/ATen headers (BSD-3), \
npm JavaScript (Artistic-2.0/ISC/MIT), Tcl/Tk libraries (TCL) |
| FIM | PSM format at rate {fim_rate} on chunks of about {chunk_chars} characters |
| training | {steps} steps x {batch} x {seq_len} = {training_tokens:,} tokens ({epochs:.2f} epochs), \
AdamW lr {lr} cosine, seed {seed}, fp32 |
| time | {minutes_total:.0f} minutes on 2 CPU cores ({minutes_training:.0f} training) |
| held-out perplexity | **{heldout_perplexity:.1f}** ({bits_per_token:.2f} bits/token) \
vs {heldout_perplexity_untrained:.0f} untrained |

Held-out text: the `eval` split of the content-hash split in `tools/corpus.py` (never
trained on; `training.json` lists the sha256 of every training file). Licence of the
weights: the training code's licences apply to the data; the weights are offered for testing.
"""


def write_model_card(out: Path) -> None:
    """README.md of the model folder, filled from training.json (rerunnable on its own)."""
    record = json.loads((out / "training.json").read_text())
    hp = record["hyperparameters"]
    params = sum(v.numel() for v in _load_state(out).values())
    text = MODEL_CARD.format(
        **{**hp, "vocab_size": json.loads((out / "config.json").read_text())["vocab_size"]},
        parameters=params, megabytes=(out / "model.safetensors").stat().st_size / 1e6,
        train_files=len(record["train_files"]), training_tokens=record["training_tokens"],
        epochs=record["training_tokens"] / record["corpus_tokens"], minutes_total=record["minutes_total"],
        minutes_training=record["minutes_training"], heldout_perplexity=record["heldout_perplexity"],
        bits_per_token=math.log2(record["heldout_perplexity"]),
        heldout_perplexity_untrained=record["heldout_perplexity_untrained"],
    )
    (out / "README.md").write_text(text)


def _load_state(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=EMBEDDED_MODEL_DIR)
    ap.add_argument("--steps", type=int, default=360)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-train-chars", type=int, default=0, help="cap the corpus (CI smoke runs)")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--card-only", action="store_true", help="only rewrite README.md from training.json")
    args = ap.parse_args(argv)
    if args.card_only:
        write_model_card(args.out)
        return
    if args.out.exists() and not args.force:
        raise SystemExit(f"error: {args.out} exists; pass --force to replace it")

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()

    files = list(iter_files())
    train_files = [f for f in files if f.split == "train"]
    eval_files = [f for f in files if f.split == "eval"]
    if args.max_train_chars:
        train_files = sorted(train_files, key=lambda f: f.sha256)
        kept, total = [], 0
        for f in train_files:
            if total >= args.max_train_chars:
                break
            kept.append(f)
            total += len(f.text)
        train_files = kept
    train_texts = [f.text for f in train_files]
    print(f"corpus: {len(train_files)} training files, {sum(map(len, train_texts)):,} chars")

    tokenizer = train_tokenizer(train_texts, VOCAB_SIZE)
    data = pack(tokenizer, train_texts, args.seq_len, args.seed)
    eval_data = pack(tokenizer, [f.text for f in eval_files][:200], args.seq_len, args.seed + 1)[:64]
    print(f"tokens: {data.numel():,} training ({len(data)} sequences), {eval_data.numel():,} held-out")
    t_tok = time.time() - t0

    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    model = build_model(len(tokenizer), eos_id)
    model.train()
    ppl_untrained = perplexity(model, eval_data[:8])
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(data), generator=gen)
    losses: list[float] = []
    t_train = time.time()
    cols = (TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.3f}"),
            TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*cols) as bar:
        task = bar.add_task("train", total=args.steps, loss=float("nan"))
        for step in range(args.steps):
            lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
            for g in opt.param_groups:
                g["lr"] = max(lr, args.lr * 0.02)
            idx = order[(torch.arange(args.batch) + step * args.batch) % len(data)]
            x = data[idx]
            # fp32 on purpose: CPUs without AVX512-BF16 emulate bf16 autocast ~10x slower.
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(task, advance=1, loss=sum(losses[-20:]) / len(losses[-20:]))
    train_minutes = (time.time() - t_train) / 60
    ppl = perplexity(model, eval_data)
    print(f"held-out perplexity {ppl:.2f} (untrained {ppl_untrained:.0f}); {train_minutes:.1f} min")

    tmp = Path(tempfile.mkdtemp(prefix=".tmp-embedded-", dir=args.out.parent))
    model.to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    record = {
        "hyperparameters": {**vars(args), "out": str(args.out), "vocab_size": VOCAB_SIZE,
                            "fim_rate": FIM_RATE, "chunk_chars": CHUNK_CHARS, **MODEL_SHAPE},
        "torch": torch.__version__,
        "training_tokens": args.steps * args.batch * args.seq_len,
        "corpus_tokens": data.numel(),
        "minutes_total": (time.time() - t0) / 60,
        "minutes_training": train_minutes,
        "minutes_tokenizer_and_packing": t_tok / 60,
        "heldout_perplexity": ppl,
        "heldout_perplexity_untrained": ppl_untrained,
        "loss_every_50_steps": losses[::50] + losses[-1:],
        "train_files": sorted(f.sha256 for f in train_files),
    }
    (tmp / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    if args.out.exists():
        shutil.rmtree(args.out)
    tmp.rename(args.out)
    write_model_card(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
