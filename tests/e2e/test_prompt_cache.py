"""`phased-dmd encode-prompts` against the diffusers pipelines' own ``encode_prompt`` (Wan and
Qwen-Image, built from tiny random text encoders and tokenizers): the rows the cache gives the
trainer are exactly what each pipeline feeds its transformer. Also: trimmed storage, resume
after an interruption without re-encoding finished shards, refusal of other inputs, bad inputs,
the CLI, several ranks, and a tiny training run on an encoded cache."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phased_dmd_mega.errors import DamagedFileError
from phased_dmd_mega.prompt_cache.command import EncodeOptions, encode_prompts
from phased_dmd_mega.prompt_cache.errors import PromptEncodingError
from phased_dmd_mega.prompt_cache.prompts import read_prompts
from phased_dmd_mega.prompt_cache.reader import PromptCache
from phased_dmd_mega.prompt_cache.text_encoders import QwenImageTextEncoder, WanTextEncoder, clean_wan_prompt

from helpers.damaged_files import (
    DAMAGE_MESSAGES,
    DAMAGES,
    WriteFailed,
    assert_failed_on,
    assert_no_staging,
    damage,
    failing_after,
    folder_contents,
    written_in_staging,
)
from helpers.tiny_text_encoders import save_qwen_text_encoder, save_wan_text_encoder

PROMPTS = [
    "a red cat sitting on the beach at sunset",
    "  the   old dog &amp;amp; a small bird\tflying over the river ",  # cleaned by the Wan pipeline
    "cinematic wide shot of a city street in the rain at night",
    "a fox",
    "slow motion " * 300,  # longer than 512 tokens: truncated
    "a blue bird",
    "zebra xylophone",  # words the tokenizer does not know
]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {"wan": save_wan_text_encoder(root / "wan"), "qwen_image": save_qwen_text_encoder(root / "qwen")}


def write_prompts(folder: Path, prompts=PROMPTS, name="prompts.txt") -> Path:
    path = folder / name
    path.write_text("\n".join(p.replace("\n", " ") for p in prompts) + "\n")
    return path


def encode(encoders, family, tmp_path, out="cache", **options) -> Path:
    options.setdefault("prompts", str(write_prompts(tmp_path)))
    if family == "wan":  # umT5's relative position buckets for 512 tokens are slow on CPU
        options.setdefault("max_sequence_length", 32)
    options = {"batch_size": 2, "shard_size": 3, "dtype": "fp32", **options}
    return encode_prompts(
        EncodeOptions(family=family, text_encoder=str(encoders[family]), out=str(tmp_path / out), **options)
    )


def batches(count, shard_size, batch_size):
    """The prompt index groups that the encoder ran together."""
    for start in range(0, count, shard_size):
        stop = min(start + shard_size, count)
        yield from (list(range(b, min(b + batch_size, stop))) for b in range(start, stop, batch_size))


def wan_pipeline(root: Path, dtype):
    from diffusers import WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    encoder = UMT5EncoderModel.from_pretrained(root / "text_encoder", dtype=dtype).eval()
    return WanPipeline(
        tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"), text_encoder=encoder, vae=None, scheduler=None
    )


def qwen_pipeline(root: Path, dtype):
    from diffusers import QwenImagePipeline
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "text_encoder", dtype=dtype).eval()
    return QwenImagePipeline(
        scheduler=None,
        vae=None,
        text_encoder=encoder,
        transformer=None,
        tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
    )


# ----------------------------------------------------------------------------- against the pipelines


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_wan_rows_are_what_the_wan_pipeline_feeds_its_transformer(encoders, tmp_path, dtype):
    negative = "blurry, static, worst quality"
    cache = PromptCache(
        encode(
            encoders,
            "wan",
            tmp_path,
            dtype=dtype,
            negative_prompt=negative,
            max_sequence_length=None,
            batch_size=4,
            shard_size=4,
        )
    )
    pipe = wan_pipeline(encoders["wan"], torch.float32 if dtype == "fp32" else torch.bfloat16)
    for group in batches(len(PROMPTS), 4, 4):
        with torch.no_grad():  # as WanPipeline.__call__ runs it
            expected, expected_negative = pipe.encode_prompt(
                [PROMPTS[i] for i in group], negative_prompt=negative, max_sequence_length=512, device="cpu"
            )
        rows, negatives = cache.conditions(group)
        assert rows.context.shape == (len(group), 512, 16) and rows.context_mask is None
        assert torch.equal(rows.context, expected)
        assert torch.equal(negatives.context, expected_negative)
    assert cache.row(4).shape[0] == 512  # the long prompt: truncated, "</s>" included


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_qwen_rows_and_masks_are_what_the_qwen_pipeline_feeds_its_transformer(encoders, tmp_path, dtype):
    cache = PromptCache(encode(encoders, "qwen_image", tmp_path, dtype=dtype))
    pipe = qwen_pipeline(encoders["qwen_image"], torch.float32 if dtype == "fp32" else torch.bfloat16)
    for group in batches(len(PROMPTS), 3, 2):
        with torch.no_grad():
            expected, mask = pipe.encode_prompt([PROMPTS[i] for i in group], device="cpu", max_sequence_length=512)
        rows = cache.rows(group)  # padded to the longest of these rows, as the pipeline pads its batch
        assert torch.equal(rows.context, expected)
        expected_mask = torch.ones(expected.shape[:2], dtype=torch.long) if mask is None else mask
        assert torch.equal(rows.context_mask, expected_mask)
    with torch.no_grad():
        expected, mask = pipe.encode_prompt(" ", device="cpu")  # the default negative prompt
    assert torch.equal(cache.negative(1).context, expected) and mask is None


def test_qwen_drops_the_34_template_tokens_and_keeps_max_sequence_length(encoders, tmp_path):
    cache = PromptCache(encode(encoders, "qwen_image", tmp_path, max_sequence_length=12))
    tokenizer = qwen_pipeline(encoders["qwen_image"], torch.float32).tokenizer
    for i, prompt in enumerate(PROMPTS):
        # What is left of the template after the drop: "<|im_end|>\n<|im_start|>assistant\n".
        kept = len(tokenizer(prompt).input_ids) + 5
        assert cache.row(i).shape[0] == min(kept, 12)
    pipe = qwen_pipeline(encoders["qwen_image"], torch.float32)
    with torch.no_grad():
        expected, _ = pipe.encode_prompt(PROMPTS[:2], device="cpu", max_sequence_length=12)
    assert torch.equal(cache.rows([0, 1]).context, expected)


def test_both_cfg_branches_share_one_padded_length(encoders, tmp_path):
    wan = PromptCache(encode(encoders, "wan", tmp_path, out="wan"))
    qwen = PromptCache(encode(encoders, "qwen_image", tmp_path, out="qwen"))
    for cache, length in ((wan, 32), (qwen, qwen.row(2).shape[0])):
        rows, negatives = cache.conditions([0, 2])
        assert rows.context.shape == negatives.context.shape == (2, length, cache.dim)
    rows, negatives = qwen.conditions([3])  # the negative " " is shorter than "a fox" with its template
    assert negatives.context_mask.sum().item() == qwen.negative_row().shape[0] < rows.context.shape[1]
    assert torch.equal(negatives.context[0, : qwen.negative_row().shape[0]], qwen.negative_row())
    assert torch.count_nonzero(negatives.context[0, qwen.negative_row().shape[0] :]) == 0


def test_the_negative_prompt_can_come_from_another_cache(encoders, tmp_path):
    # data.negative_prompt_cache: try another negative prompt without encoding the prompts again.
    plain = encode(encoders, "wan", tmp_path, out="plain")
    other = encode(
        encoders,
        "wan",
        tmp_path,
        out="other",
        prompts=str(write_prompts(tmp_path, ["a"], "one.txt")),
        negative_prompt="blurry, static",
    )
    cache = PromptCache(plain, negative_from=other)
    assert torch.equal(cache.negative_row(), PromptCache(other).negative_row())
    assert not torch.equal(cache.negative_row(), PromptCache(plain).negative_row())
    qwen = encode(encoders, "qwen_image", tmp_path, out="qwen")
    with pytest.raises(ValueError, match="negative prompt cache .*qwen \\(qwen_image, width 24\\) does not match"):
        PromptCache(plain, negative_from=qwen)


def test_wan_prompt_cleaning_matches_the_pipeline():
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    for text in ["  a\u3000cat\n\ton &amp;amp; the\x1cbeach  ", "&lt;b&gt; bold", "caf\u00e9 \u00a0 x", ""]:
        assert clean_wan_prompt(text) == prompt_clean(text)


# ----------------------------------------------------------------------------- storage and resume


def test_rows_are_stored_trimmed_with_an_index(encoders, tmp_path):
    folder = encode(encoders, "wan", tmp_path)
    index = json.loads((folder / "prompts.json").read_text())
    assert index["complete"] and index["family"] == "wan" and index["pad_to"] == 32 and not index["masked"]
    assert index["count"] == len(PROMPTS) and [s["count"] for s in index["shards"]] == [3, 3, 1]
    cache = PromptCache(folder)
    lengths = [cache.row(i).shape[0] for i in range(len(PROMPTS))]
    assert sum(s["tokens"] for s in index["shards"]) == sum(lengths) < 32 * len(PROMPTS) / 2
    assert lengths[0] == len(PROMPTS[0].split()) + 1  # the words and "</s>"
    padded = cache.rows([0]).context[0]
    assert torch.equal(padded[: lengths[0]], cache.row(0)) and torch.count_nonzero(padded[lengths[0] :]) == 0


def same_content(first: Path, second: Path) -> bool:
    """The same tensors and metadata (safetensors orders its metadata differently in each process)."""
    from safetensors import safe_open

    with safe_open(str(first), "pt") as a, safe_open(str(second), "pt") as b:
        return (
            a.metadata() == b.metadata()
            and sorted(a.keys()) == sorted(b.keys())
            and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
        )


class Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_without_re_encoding_finished_shards(encoders, tmp_path, monkeypatch):
    reference = encode(encoders, "wan", tmp_path, out="reference")
    encode_batch = WanTextEncoder.encode
    encoded = []

    def failing(self, prompts):
        if len(encoded) == 5:  # the negative, then shards 0 and 1 (2 batches each); not shard 2
            raise Interrupted
        encoded.append(list(prompts))
        return encode_batch(self, prompts)

    monkeypatch.setattr(WanTextEncoder, "encode", failing)
    with pytest.raises(Interrupted):
        encode(encoders, "wan", tmp_path)
    folder = tmp_path / "cache"
    with pytest.raises(ValueError, match="unfinished prompt cache: re-run"):
        PromptCache(folder)
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("shard-*.safetensors")}
    assert sorted(finished) == ["shard-00000.safetensors", "shard-00001.safetensors"]

    encoded.clear()

    def counting(self, prompts):
        encoded.append(list(prompts))
        return encode_batch(self, prompts)

    monkeypatch.setattr(WanTextEncoder, "encode", counting)
    encode(encoders, "wan", tmp_path)
    assert encoded == [[PROMPTS[6]]]  # only the last shard (the negative was written before the interruption)
    for name, stamp in finished.items():
        assert ((folder / name).stat().st_ino, (folder / name).stat().st_mtime_ns) == stamp
    for path in reference.glob("*.safetensors"):
        assert same_content(folder / path.name, path)
    assert len(PromptCache(folder)) == len(PROMPTS)
    encoded.clear()
    encode(encoders, "wan", tmp_path)  # finished: nothing to do, not even loading the encoder
    assert encoded == []


def test_a_shard_write_failing_partway_leaves_no_torn_file_and_an_unfinished_cache(encoders, tmp_path, monkeypatch):
    """The negative and shard 0 are written; shard 1's file is torn halfway (a full disk)."""
    import safetensors.torch

    real, calls = safetensors.torch.save_file, []

    def save_file(tensors, path, metadata=None):
        calls.append(path)
        real(tensors, path, metadata=metadata)
        if len(calls) == 3:
            Path(path).write_bytes(Path(path).read_bytes()[: Path(path).stat().st_size // 2])
            raise WriteFailed(28, "No space left on device (injected)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(WriteFailed):
        encode(encoders, "wan", tmp_path)
    folder = tmp_path / "cache"
    assert sorted(p.name for p in folder.iterdir()) == [
        "negative.safetensors",
        "prompts.json",
        "shard-00000.safetensors",
    ]
    with pytest.raises(ValueError, match="unfinished prompt cache: re-run"):
        PromptCache(folder)
    monkeypatch.undo()
    assert len(PromptCache(encode(encoders, "wan", tmp_path))) == len(PROMPTS)


def test_an_overwrite_failing_partway_leaves_the_replaced_cache_intact_and_resumes(encoders, tmp_path, monkeypatch):
    """--overwrite builds the new cache beside the old one: the old one stays whole and readable
    until the new one is complete; re-running the command finishes the new one without
    re-encoding its finished shards, then replaces the old one (other files of --out kept)."""
    from phased_dmd_mega.prompt_cache import command

    folder = encode(encoders, "wan", tmp_path)
    (folder / "notes.txt").write_text("kept beside the cache")
    before, old_rows = folder_contents(folder), [PromptCache(folder).row(i) for i in range(len(PROMPTS))]
    other = write_prompts(tmp_path, PROMPTS[::-1], "other.txt")
    write = failing_after(command.write_rows, 2)  # the negative and shard 0; shard 1 fails
    monkeypatch.setattr(command, "write_rows", write)
    with pytest.raises(WriteFailed):
        encode(encoders, "wan", tmp_path, prompts=str(other), overwrite=True)
    assert written_in_staging(write.done, folder)
    assert folder_contents(folder) == before
    assert all(torch.equal(PromptCache(folder).row(i), row) for i, row in enumerate(old_rows))

    monkeypatch.undo()
    encode_batch, encoded = WanTextEncoder.encode, []

    def counting(self, prompts):
        encoded.append(list(prompts))
        return encode_batch(self, prompts)

    monkeypatch.setattr(WanTextEncoder, "encode", counting)
    encode(encoders, "wan", tmp_path, prompts=str(other), overwrite=True)
    assert [p for batch in encoded for p in batch] == PROMPTS[::-1][3:]  # shards 1 and 2 only
    assert len(PromptCache(folder)) == len(PROMPTS)
    assert json.loads((folder / "prompts.json").read_text())["source"]["prompts"] == str(other.resolve())
    assert (folder / "notes.txt").read_text() == "kept beside the cache"
    assert_no_staging(folder)


def test_other_inputs_are_refused_unless_overwrite(encoders, tmp_path):
    encode(encoders, "wan", tmp_path)
    other = write_prompts(tmp_path, PROMPTS[:2], "other.txt")
    refusal = r"holds a prompt cache of other inputs \(differing: prompts\).*--overwrite"
    with pytest.raises(PromptEncodingError, match=refusal):
        encode(encoders, "wan", tmp_path, prompts=str(other))
    with pytest.raises(PromptEncodingError, match="differing: negative_prompt"):
        encode(encoders, "wan", tmp_path, negative_prompt="ugly")
    encode(encoders, "wan", tmp_path, prompts=str(other), overwrite=True)
    folder = tmp_path / "cache"
    assert sorted(p.name for p in folder.iterdir()) == [
        "negative.safetensors",
        "prompts.json",
        "shard-00000.safetensors",
    ]
    assert len(PromptCache(folder)) == 2


def test_bad_inputs_name_the_file_or_option(encoders, tmp_path):
    with pytest.raises(PromptEncodingError, match="--prompts .*missing.txt does not exist"):
        encode(encoders, "wan", tmp_path, prompts=str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(PromptEncodingError, match="--prompts .*empty.txt holds no prompts"):
        encode(encoders, "wan", tmp_path, prompts=str(empty))
    with pytest.raises(PromptEncodingError, match="is a 'qwen2_5_vl' model .*--family wan needs umT5"):
        encode_prompts(
            EncodeOptions(
                family="wan",
                text_encoder=str(encoders["qwen_image"]),
                prompts=str(write_prompts(tmp_path)),
                out=str(tmp_path / "x"),
            )
        )
    with pytest.raises(PromptEncodingError, match="--text-encoder .*no config.json"):
        encode_prompts(
            EncodeOptions(
                family="wan", text_encoder=str(tmp_path), prompts=str(write_prompts(tmp_path)), out=str(tmp_path / "x")
            )
        )
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(PromptEncodingError, match="--out .*busy exists, is not empty and is not a prompt cache"):
        encode(encoders, "wan", tmp_path, out="busy", overwrite=True)
    with pytest.raises(PromptEncodingError, match="--max-sequence-length 2000: qwen_image takes 1 to 1024"):
        QwenImageTextEncoder(encoders["qwen_image"] / "text_encoder", encoders["qwen_image"] / "tokenizer", 2000)
    wan = PromptCache(encode(encoders, "wan", tmp_path))
    with pytest.raises(ValueError, match=r"holds wan embeddings of width 16; the model \(wan\) takes text of width 32"):
        wan.check_model("wan", 32)


@pytest.mark.parametrize("how", [*DAMAGES, "missing_shard"])
def test_a_damaged_or_missing_shard_is_refused_up_front_and_fails_train_in_one_line(encoders, tmp_path, capsys, how):
    from phased_dmd_mega import cli

    from helpers.tiny_runs import write_config

    folder = encode(encoders, "wan", tmp_path)
    shard = folder / "shard-00001.safetensors"
    if how == "missing_shard":
        shard.unlink()
        file, message = folder / "prompts.json", re.escape(f"names shards that are not in {folder}: ['{shard.name}']")
    else:
        file, message = damage(shard, how), DAMAGE_MESSAGES[how]
    with pytest.raises(DamagedFileError, match=message):
        PromptCache(folder)
    config = write_config(tmp_path, data={"prompt_cache": str(folder), "synthetic_prompts": 0})
    capsys.readouterr()
    assert_failed_on(cli.main(["train", "--config", str(config)]), capsys.readouterr().err, file, message)
    assert not (tmp_path / "run").exists()


def rewrite_shard(path: Path, change) -> None:
    """Rewrite a shard with ``change(tensors)`` applied, keeping its stamp (metadata)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = handle.metadata()
    save_file(change(tensors), str(path), metadata=metadata)


def drop_last_row(tensors):
    offsets = tensors["offsets"]
    return {"context": tensors["context"][: offsets[-2]].clone(), "offsets": offsets[:-1].clone()}


def offsets_past_the_end(tensors):
    offsets = tensors["offsets"].clone()
    offsets[-1] += 5
    return {**tensors, "offsets": offsets}


def mix_in_another_encoding(encoders, tmp_path, folder: Path) -> None:
    other = encode(encoders, "wan", tmp_path, out="other", prompts=str(write_prompts(tmp_path, PROMPTS[::-1], "b.txt")))
    shutil.copyfile(other / "shard-00001.safetensors", folder / "shard-00001.safetensors")


SHARD_MISMATCHES = {
    "another_encodings_shard": r"shard-00001\.safetensors was encoded from other inputs \(stamp \w+, the index's \w+\)",
    "a_row_short": r"shard-00001\.safetensors holds offsets \(3,\) \(the index says 3 rows: \(4,\)\)",
    "offsets_past_the_end": r"shard-00001\.safetensors holds offsets that do not cut its \d+ context tokens into rows",
    "index_count": r"prompts\.json says 8 prompts, and its shards hold 7",
}


@pytest.mark.parametrize("how", SHARD_MISMATCHES)
def test_a_shard_that_disagrees_with_the_index_is_refused_at_open_and_fails_train_in_one_line(
    encoders, tmp_path, capsys, how
):
    from phased_dmd_mega import cli

    from helpers.tiny_runs import write_config

    folder = encode(encoders, "wan", tmp_path)
    shard, index_file = folder / "shard-00001.safetensors", folder / "prompts.json"
    if how == "another_encodings_shard":
        mix_in_another_encoding(encoders, tmp_path, folder)
    elif how == "a_row_short":
        rewrite_shard(shard, drop_last_row)
    elif how == "offsets_past_the_end":
        rewrite_shard(shard, offsets_past_the_end)
    else:
        index = json.loads(index_file.read_text())
        index_file.write_text(json.dumps({**index, "count": index["count"] + 1}))
    file = index_file if how == "index_count" else shard
    with pytest.raises(DamagedFileError, match=SHARD_MISMATCHES[how]):
        PromptCache(folder)
    config = write_config(tmp_path, data={"prompt_cache": str(folder), "synthetic_prompts": 0})
    capsys.readouterr()
    err = assert_failed_on(cli.main(["train", "--config", str(config)]), capsys.readouterr().err, file)
    assert re.search(SHARD_MISMATCHES[how], err), err
    assert not (tmp_path / "run").exists()


def test_prompt_files(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n\n"a dog"\n{"text": "x", "prompt": "a fox"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a cat", "a dog", "a fox"]
    (tmp_path / "p.csv").write_text('id,caption\n1,"a cat, sitting"\n2,a dog\n')
    assert read_prompts(tmp_path / "p.csv", field="caption") == ["a cat, sitting", "a dog"]
    (tmp_path / "p.json").write_text('["a cat", {"prompt": "a dog"}]')
    assert read_prompts(tmp_path / "p.json") == ["a cat", "a dog"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": \n')
    with pytest.raises(PromptEncodingError, match="bad.jsonl line 2: not JSON"):
        read_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(PromptEncodingError, match="p.csv: no 'prompt' column"):
        read_prompts(tmp_path / "p.csv")
    (tmp_path / "bad.json").write_text('["a cat",')
    with pytest.raises(PromptEncodingError, match="bad.json line 1: not JSON"):
        read_prompts(tmp_path / "bad.json")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(PromptEncodingError, match="latin1.txt is not UTF-8 text"):
        read_prompts(tmp_path / "latin1.txt")
    with pytest.raises(PromptEncodingError, match="unknown kind '.parquet'"):
        (tmp_path / "p.parquet").write_text("")
        read_prompts(tmp_path / "p.parquet")


# ----------------------------------------------------------------------------- command line, ranks, training


def test_the_command_encodes_resumes_and_reports_errors(encoders, tmp_path, capsys):
    from phased_dmd_mega.cli import main

    prompts, out = write_prompts(tmp_path), tmp_path / "cache"
    # A pipeline root and a .txt file: the tokenizer is found in the root's tokenizer/.
    args = [
        "encode-prompts",
        "--family",
        "qwen_image",
        "--text-encoder",
        str(encoders["qwen_image"]),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--shard-size",
        "4",
        "--dtype",
        "fp32",
    ]
    script = Path(sys.executable).parent / "phased-dmd"  # the installed console script, end to end
    result = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out) and "prompt cache" in result.stderr
    cache = PromptCache(out)
    assert len(cache) == len(PROMPTS) and cache.family == "qwen_image" and cache.masked
    # The text encoder folder itself: the tokenizer is its sibling; the inputs are the same.
    assert main([*args, "--text-encoder", str(encoders["qwen_image"] / "text_encoder")]) == 0
    assert "resuming: 2 of 2 shards are already written" in capsys.readouterr().err
    assert main([*args, "--family", "wan"]) == 2
    assert "encode-prompts: error: --text-encoder" in capsys.readouterr().err


def encode_on_rank(encoders, prompts, out):
    torch.set_num_threads(1)
    return str(
        encode_prompts(
            EncodeOptions(
                family="wan",
                text_encoder=str(encoders["wan"]),
                prompts=prompts,
                out=out,
                batch_size=2,
                shard_size=2,
                dtype="fp32",
            )
        )
    )


def refusal_on_rank(encoders, prompts, out):
    try:
        encode_on_rank(encoders, prompts, out)
    except PromptEncodingError as err:
        return str(err)
    return "encoded"


@pytest.mark.slow
def test_several_ranks_write_the_cache_one_process_writes(encoders, tmp_path):
    from phased_dmd_mega.testing import run_distributed

    prompts = str(write_prompts(tmp_path))
    run_distributed(encode_on_rank, 2, encoders, prompts, str(tmp_path / "ranks"))
    encode_on_rank(encoders, prompts, str(tmp_path / "single"))
    single = sorted((tmp_path / "single").glob("*.safetensors"))
    assert [p.name for p in single] == sorted(p.name for p in (tmp_path / "ranks").glob("*.safetensors"))
    for path in single:
        assert same_content(tmp_path / "ranks" / path.name, path)
    ranks, alone = (json.loads((tmp_path / name / "prompts.json").read_text()) for name in ("ranks", "single"))
    assert ranks["shards"] == alone["shards"] and ranks["complete"]
    # Rank 0 checks the folder; its refusal reaches every rank instead of leaving them waiting.
    other = str(write_prompts(tmp_path, PROMPTS[:3], "other.txt"))
    refusals = run_distributed(refusal_on_rank, 2, encoders, other, str(tmp_path / "ranks"))
    assert all("holds a prompt cache of other inputs" in message for message in refusals)


def test_the_trainer_trains_on_an_encoded_cache(encoders, tmp_path):
    import yaml

    from phased_dmd_mega import parallel
    from phased_dmd_mega.config import load_config
    from phased_dmd_mega.distill.build import build_prompts, build_teacher, latent_geometry
    from phased_dmd_mega.distill.trainer import Trainer

    root = save_wan_text_encoder(tmp_path / "encoder", d_model=32)  # the tiny Wan preset's text_dim
    folder = encode({"wan": root}, "wan", tmp_path, negative_prompt="blurry")
    narrow = encode(encoders, "wan", tmp_path, out="narrow")  # 16 wide
    config = {
        "run": {"seed": 0, "output_dir": str(tmp_path / "run")},
        "model": {"family": "wan", "preset": "tiny", "dtype": "float32", "attention_backend": "sdpa"},
        "phases": {
            "num_steps": 4,
            "num_phases": 2,
            "iterations_per_phase": 1,
            "fake_updates_per_generator_update": 1,
            "guidance_scale": 3.0,
        },
        "data": {
            "prompt_cache": str(folder),
            "batch_size": 2,
            "resolutions": [{"frames": 1, "height": 16, "width": 16}],
        },
        "checkpoint": {"dir": str(tmp_path / "run" / "checkpoints"), "save_every": 100},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    cfg = load_config(tmp_path / "run.yaml")
    parallel.initialize(seed=cfg.run.seed)
    try:
        teacher = build_teacher(cfg)
        prompts = build_prompts(cfg, teacher.high.dims)
        assert isinstance(prompts, PromptCache) and len(prompts) == len(PROMPTS)
        assert Trainer(cfg, teacher, prompts, latent_geometry(teacher.high.dims)).run() == 2
        with pytest.raises(ValueError, match=r"holds wan embeddings of width 16; the model \(wan\) takes text"):
            build_prompts(load_config(tmp_path / "run.yaml", [f"data.prompt_cache={narrow}"]), teacher.high.dims)
    finally:
        parallel.destroy()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["dmd_loss"] > 0 and r["fake_loss"] > 0 for r in records)


def test_precomputed_embeddings_make_a_cache_the_trainer_reads(tmp_path):
    from phased_dmd_mega.prompt_cache.writer import write_embeddings_cache

    rows = [torch.randn(3, 8), torch.randn(5, 8)]
    folder = write_embeddings_cache(tmp_path / "cache", rows, torch.zeros(2, 8), pad_to=6)
    cache = PromptCache(folder)
    got = cache.rows([1, 0]).context
    assert got.shape == (2, 6, 8)
    assert torch.equal(got[0, :5], rows[1]) and torch.equal(got[1, :3], rows[0]) and not got[1, 3:].any()
    with pytest.raises(PromptEncodingError, match="exists and is not empty"):
        write_embeddings_cache(folder, rows, torch.zeros(2, 8))
    with pytest.raises(PromptEncodingError, match="one D"):
        write_embeddings_cache(tmp_path / "other", [torch.randn(3, 8), torch.randn(3, 4)], torch.zeros(2, 8))
