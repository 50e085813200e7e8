"""Tiny random text encoders and word-level tokenizers, saved as diffusers pipeline roles
(``text_encoder/`` + ``tokenizer/``) for the prompt-encoding tests.

The Qwen tokenizer splits the Qwen-Image template as the real Qwen2.5 tokenizer does (newlines
are tokens of their own), so its system part plus ``<|im_start|>user\\n`` is exactly the 34 tokens
that the pipeline drops.
"""

import re
from pathlib import Path

import torch

WORDS = """
    a an the cat dog bird fox on in under over with and of at by red blue green small big old young
    running sitting flying sleeping beach snow forest city street river mountain night day sunset
    rain painting photo video cinematic slow motion close up wide shot
""".split()
QWEN_TEMPLATE_WORDS = re.findall(
    r"\w+|[^\w\s]",
    "system Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background: user assistant",
)


def _word_level(vocab, split_newlines: bool):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    if split_newlines:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(r"[ \t]+"), "removed"),
                pre_tokenizers.Split(Regex(r"\n|\w+|[^\w\s]"), "isolated"),
            ]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
        )
    return tokenizer


def _vocab(specials, words):
    vocab = {}
    for token in list(specials) + sorted(set(words)):
        vocab.setdefault(token, len(vocab))
    return vocab


def save_wan_text_encoder(root: Path, d_model: int = 16, seed: int = 0) -> Path:
    """A umT5 encoder of width ``d_model`` and a T5-like tokenizer (appends ``</s>``) under ``root``."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = _vocab(["<pad>", "</s>", "<unk>"], WORDS + list("&,.:;!?'\"-()"))
    tokenizer = _word_level(vocab, split_newlines=False)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", eos_token="</s>"
    ).save_pretrained(root / "tokenizer")
    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=len(vocab) + 3,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    UMT5EncoderModel(config).eval().save_pretrained(root / "text_encoder")
    return root


def save_qwen_text_encoder(root: Path, hidden: int = 24, seed: int = 0) -> Path:
    """A Qwen2.5-VL model (tiny text and vision towers) and a tokenizer for its chat template."""
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "\n"]
    vocab = _vocab(specials, WORDS + QWEN_TEMPLATE_WORDS + list("&,.:;!?'\"-()"))
    PreTrainedTokenizerFast(
        tokenizer_object=_word_level(vocab, split_newlines=True),
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    ).save_pretrained(root / "tokenizer")
    heads = 2
    text = dict(
        vocab_size=len(vocab) + 8,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=1,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [hidden // heads // 6] * 3},
    )
    vision = dict(
        depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=hidden, fullatt_block_indexes=[0]
    )
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=len(vocab) + 1,
        video_token_id=len(vocab) + 2,
        vision_start_token_id=len(vocab) + 3,
        vision_end_token_id=len(vocab) + 4,
    )
    Qwen2_5_VLForConditionalGeneration(config).eval().save_pretrained(root / "text_encoder")
    return root
