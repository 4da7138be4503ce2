"""Write tiny GGUF test models: llama architecture, random weights, SentencePiece-style vocabulary.

The files are a few hundred KB, load in milliseconds and generate nonsense quickly, which is what
engine tests need: both llama.cpp and ctransformers 0.2.27 can read them (ctransformers only reads
Llama-2-era files whose tokenizer model is "llama", i.e. SentencePiece).

    python scripts/make_tiny_gguf.py models/tiny.gguf [--seed 0] [--no-chat-template]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType, quants

# Small but not degenerate: 2 layers, grouped-query attention (4 query heads, 2 KV heads).
EMBEDDING_LENGTH = 64
FEED_FORWARD_LENGTH = 128
BLOCK_COUNT = 2
HEAD_COUNT = 4
HEAD_COUNT_KV = 2
CONTEXT_LENGTH = 4096

# ChatML, as SmolLM2 and many others use; the "<|im_start|>"/"<|im_end|>" tokens are in the vocab.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Words (with the SentencePiece word-start marker) and a few non-ASCII characters, so that
# generated text mixes multi-character pieces, multibyte characters and raw byte tokens.
WORDS = (
    "the of and to in is it that was for on are with as his they be at one have this from "
    "or had by word but what some we can out other were all there when up use your how said "
    "an each she which do their time if will way about many then them write would like so "
    "these her long make thing see him two has look more day could go come did number sound "
    "no most people my over know water than call first who may down side been now find "
    "hello world paris france capital city stop yes"
).split()
NON_ASCII_PIECES = ["é", "ü", "ñ", "日", "本", "語", "€", "😀"]
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
SPIECE_UNDERLINE = "\u2581"


def build_vocab(chat_token_type: TokenType = TokenType.CONTROL,
                extra_control_tokens: tuple[str, ...] = ()) -> tuple[list[str], list[float], list[int]]:
    """Return tokens, scores and token types of a SentencePiece-style vocabulary (the ChatML tokens of
    `chat_token_type`: some converters mark them user-defined; then `extra_control_tokens`, e.g. another
    template's markup).

    llama.cpp's SPM tokenizer builds words by merging adjacent pieces, so every prefix of a word
    must be a token too; longer pieces get higher scores so that merging prefers them.
    """
    tokens = ["<unk>", "<s>", "</s>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    # Byte fallback tokens: llama.cpp needs at least <0x0A> (newline) for an SPM vocabulary.
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [TokenType.BYTE] * 256
    tokens += CHAT_TOKENS
    types += [chat_token_type] * len(CHAT_TOKENS)
    tokens += list(extra_control_tokens)
    types += [TokenType.CONTROL] * len(extra_control_tokens)

    pieces: dict[str, None] = {}  # ordered set
    for char in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'":
        pieces[char] = None
        pieces[SPIECE_UNDERLINE + char] = None
    pieces[SPIECE_UNDERLINE] = None
    for word in WORDS:
        marked = SPIECE_UNDERLINE + word
        for end in range(2, len(marked) + 1):
            pieces[marked[:end]] = None
    for piece in NON_ASCII_PIECES:
        pieces[piece] = None

    scores = [0.0] * len(tokens)
    for piece in pieces:
        tokens.append(piece)
        types.append(TokenType.NORMAL)
        scores.append(float(len(piece)))
    return tokens, scores, [int(t) for t in types]


def _random_weights(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


WEIGHT_TYPES = ("f32", "q8_0", "f32_of_q8_0")


def write_tiny_gguf(path, *, seed: int = 0, with_chat_template: bool = True, never_ends: bool = False,
                    user_defined_chat_tokens: bool = False, extra_control_tokens: tuple[str, ...] = (),
                    weights: str = "f32", embedding_length: int = EMBEDDING_LENGTH) -> Path:
    """Write a tiny random llama-architecture GGUF file to `path` and return its Path.

    `user_defined_chat_tokens`: "<|im_start|>" and "<|im_end|>" are user-defined tokens, not control ones.
    `extra_control_tokens`: more control tokens (another chat template's markup).

    `never_ends`: the control tokens (end of text, <|im_end|>) get zero logits, so greedy decoding
    practically never picks them and a reply runs to max_tokens whatever the CPU's rounding.

    `weights`: the matrices' type: "f32", "q8_0", or "f32_of_q8_0" (F32 holding the values of the "q8_0" file of
    the same seed, to check Q8_0 kernels against). `embedding_length`: a multiple of 32 (Q8_0 blocks) and of the
    4 heads.
    """
    if weights not in WEIGHT_TYPES:
        raise ValueError(f"weights must be one of {WEIGHT_TYPES}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tokens, scores, token_types = build_vocab(TokenType.USER_DEFINED if user_defined_chat_tokens
                                              else TokenType.CONTROL, tuple(extra_control_tokens))
    n_vocab = len(tokens)
    head_dim = embedding_length // HEAD_COUNT

    writer = GGUFWriter(str(path), "llama")
    writer.add_name(f"tiny-random-llama-seed{seed}")
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(embedding_length)
    writer.add_block_count(BLOCK_COUNT)
    writer.add_feed_forward_length(FEED_FORWARD_LENGTH)
    writer.add_head_count(HEAD_COUNT)
    writer.add_head_count_kv(HEAD_COUNT_KV)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(LlamaFileType.MOSTLY_Q8_0 if weights == "q8_0" else LlamaFileType.ALL_F32)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(token_types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if with_chat_template:
        writer.add_chat_template(CHATML_TEMPLATE)

    # numpy shapes are (rows, columns); GGUF stores them reversed, as ggml expects.
    kv_dim = head_dim * HEAD_COUNT_KV
    tensors = {
        "token_embd.weight": _random_weights(rng, (n_vocab, embedding_length), 1.0),
        "output_norm.weight": np.ones(embedding_length, dtype=np.float32),
        # A large output scale keeps the logits far apart, so greedy decoding does not hinge on
        # rounding differences between batch shapes.
        "output.weight": _random_weights(rng, (n_vocab, embedding_length), 1.0),
    }
    if never_ends:
        control = [index for index, kind in enumerate(token_types) if kind == int(TokenType.CONTROL)]
        tensors["output.weight"][control] = 0.0
    for block in range(BLOCK_COUNT):
        prefix = f"blk.{block}."
        tensors |= {
            prefix + "attn_norm.weight": np.ones(embedding_length, dtype=np.float32),
            prefix + "attn_q.weight": _random_weights(rng, (embedding_length, embedding_length), 0.2),
            prefix + "attn_k.weight": _random_weights(rng, (kv_dim, embedding_length), 0.2),
            prefix + "attn_v.weight": _random_weights(rng, (kv_dim, embedding_length), 0.2),
            prefix + "attn_output.weight": _random_weights(rng, (embedding_length, embedding_length), 0.2),
            prefix + "ffn_norm.weight": np.ones(embedding_length, dtype=np.float32),
            prefix + "ffn_gate.weight": _random_weights(rng, (FEED_FORWARD_LENGTH, embedding_length), 0.2),
            prefix + "ffn_up.weight": _random_weights(rng, (FEED_FORWARD_LENGTH, embedding_length), 0.2),
            prefix + "ffn_down.weight": _random_weights(rng, (embedding_length, FEED_FORWARD_LENGTH), 0.2),
        }
    for name, data in tensors.items():
        if weights == "f32" or data.ndim == 1:  # norms stay F32 in every file
            writer.add_tensor(name, data, raw_dtype=GGMLQuantizationType.F32)
            continue
        blocks = quants.quantize(data, GGMLQuantizationType.Q8_0)
        if weights == "q8_0":
            writer.add_tensor(name, blocks, raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, quants.dequantize(blocks, GGMLQuantizationType.Q8_0),
                              raw_dtype=GGMLQuantizationType.F32)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="where to write the .gguf file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--no-chat-template", action="store_true", help="omit tokenizer.chat_template")
    args = parser.parse_args(argv)
    written = write_tiny_gguf(args.path, seed=args.seed, with_chat_template=not args.no_chat_template)
    print(f"wrote {written} ({written.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
