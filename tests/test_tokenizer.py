"""Prompt tokenisation: the ids Stable Diffusion's pipelines feed the text encoder.

The tokenizer folders hold CLIP's real BPE vocabulary (see `jaxvision/testing/clip_tokenizer.py`), so ids
are those of the `openai/clip-vit-large-patch14` tokenizer that SD checkpoints ship.
"""

import numpy as np
import pytest
import transformers

from jaxvision.errors import ConfigError
from jaxvision.testing.clip_tokenizer import write_clip_tokenizer
from jaxvision.tokenizer import load_tokenizer, tokenize

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "A PHOTO OF A CAT",
    "Hello, world!!! (masterpiece:1.2), [best quality] {sks} dog -- 50% off?!",
    "don't it's we'll they're I'm you'd",
    "café naïve façade — 日本語のテキスト, Ελληνικά, emoji 🚀✨👩‍🚀",
    "  multiple   spaces\tand\nnewlines  ",
    "1234567890 3.14159 2024-01-01",
    "",
    " ".join(["an extremely detailed, intricate, award-winning photograph"] * 12),  # far beyond 77 tokens
    "日本語" * 60,  # long run of multi-byte characters, cut mid-word
]
BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "sd1": write_clip_tokenizer(root / "sd1"),  # pads with <|endoftext|>
        "sd2": write_clip_tokenizer(root / "sd2", pad_token="!"),  # pads with "!" (id 0)
    }


def _as_diffusers_calls_it(path) -> np.ndarray:
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(path))
    return tokenizer(
        PROMPTS, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="np"
    ).input_ids


@pytest.mark.parametrize("release", ["sd1", "sd2"])
def test_ids_match_the_diffusers_call(folders, release):
    """Ids equal transformers' CLIPTokenizer called as StableDiffusionPipeline calls it, for prompts with
    punctuation, case, unicode, whitespace, digits, the empty prompt and prompts over 77 tokens."""
    ids = tokenize(load_tokenizer(folders[release]), PROMPTS)
    assert ids.shape == (len(PROMPTS), 77) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids, _as_diffusers_calls_it(folders[release]))


def test_known_ids_padding_and_truncation(folders):
    """Independent of the reference call: CLIP's known ids for a short prompt, SD 1.x / SD 2.x padding,
    the empty prompt, and truncation that keeps <|endoftext|> as the 77th token."""
    sd1, sd2 = load_tokenizer(folders["sd1"]), load_tokenizer(folders["sd2"])
    cat = [BOS, 320, 1125, 539, 320, 2368, EOS]  # "a photo of a cat" in CLIP's vocabulary
    np.testing.assert_array_equal(tokenize(sd1, "a photo of a cat")[0], cat + [EOS] * 70)
    np.testing.assert_array_equal(tokenize(sd2, "a photo of a cat")[0], cat + [0] * 70)
    np.testing.assert_array_equal(tokenize(sd1, [""])[0], [BOS] + [EOS] * 76)
    np.testing.assert_array_equal(tokenize(sd2, [""])[0], [BOS, EOS] + [0] * 75)
    long = tokenize(sd2, PROMPTS[-2:])
    assert (long[:, 0] == BOS).all() and (long[:, -1] == EOS).all() and (long[:, 1:-1] != 0).all()
    assert (long[:, 1:-1] < BOS).all()


def test_batch_rows_are_independent_and_max_length(folders):
    """A batch equals its prompts tokenised one by one; max_length overrides model_max_length."""
    tokenizer = load_tokenizer(folders["sd1"])
    batch = tokenize(tokenizer, PROMPTS)
    for row, prompt in zip(batch, PROMPTS, strict=True):
        np.testing.assert_array_equal(tokenize(tokenizer, prompt)[0], row)
    short = tokenize(tokenizer, PROMPTS, max_length=16)
    assert short.shape == (len(PROMPTS), 16)
    np.testing.assert_array_equal(short[:, :15], batch[:, :15])
    assert tokenize(tokenizer, []).shape == (0, 77)


def test_missing_or_incomplete_folder_is_a_clear_error(tmp_path, folders):
    """A missing tokenizer folder, or one without a file the tokenizer needs, fails naming what is missing."""
    with pytest.raises(ConfigError, match="tokenizer folder not found"):
        load_tokenizer(tmp_path / "nowhere")
    for name in ("merges.txt", "vocab.json", "tokenizer_config.json"):
        broken = write_clip_tokenizer(tmp_path / f"without-{name}")
        (broken / name).unlink()
        with pytest.raises(ConfigError, match=f"missing {name}"):
            load_tokenizer(broken)
