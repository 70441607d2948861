"""LiteWhisper model classes on the real whisper-base: exact and truncated factorisations, save/load, format."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import greedy_transcripts, load, short_clips
from lite_whisper import LiteWhisperConfig, LiteWhisperForConditionalGeneration, LowRankLinear, build_lite_whisper
from lite_whisper.factorize import exact_factors
from lite_whisper.modeling_lite_whisper import encoder_projection

DECODER_PREFIX = torch.tensor([[50258, 50259, 50359, 50363, 440, 1349]])  # <|sot|><|en|><|transcribe|><|notimestamps|> The ...


@pytest.fixture(scope="module")
def exact_lite(whisper_model):
    return build_lite_whisper(whisper_model, exact_factors(whisper_model))


@pytest.fixture(scope="module")
def truncated_lite(whisper_model):
    return build_lite_whisper(whisper_model, exact_factors(whisper_model, rank=128))


@pytest.fixture(scope="module")
def clips(dev_rows):
    return [load(r) for r in short_clips(dev_rows, 12)]


def features(processor, arrays):
    return processor.feature_extractor(arrays, sampling_rate=16000, return_tensors="pt").input_features


def test_exact_factorisation_matches_whisper_logits(whisper_model, exact_lite, processor, clips):
    assert all(isinstance(encoder_projection(layer, key), LowRankLinear)
               for layer in exact_lite.model.encoder.layers for key in ("q_proj", "k_proj", "fc2"))
    x = features(processor, clips[:3])
    prefix = DECODER_PREFIX.repeat(3, 1)
    with torch.no_grad():
        reference = whisper_model(x, decoder_input_ids=prefix).logits
        ours = exact_lite(x, decoder_input_ids=prefix).logits
    assert reference.shape == ours.shape
    assert (reference - ours).abs().max().item() < 1e-4


@pytest.mark.slow
def test_exact_factorisation_same_greedy_transcripts(whisper_model, exact_lite, processor, clips):
    reference = greedy_transcripts(whisper_model, processor, clips)
    ours = greedy_transcripts(exact_lite, processor, clips)
    assert len(reference) >= 10
    assert ours == reference
    assert sum(bool(t) for t in reference) >= 10  # the real model really transcribes


def test_truncated_factorisation_save_reload_bit_identical(truncated_lite, processor, clips, tmp_path):
    report = truncated_lite.encoder_parameter_report()
    assert report["encoder_params"] < report["original_encoder_params"]
    assert all(row["ranks"] == {k: 128 for k in ("fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj")}
               for row in report["layers"])
    truncated_lite.save_pretrained(tmp_path)
    for name in ("config.json", "model.safetensors", "configuration_lite_whisper.py", "modeling_lite_whisper.py"):
        assert (tmp_path / name).is_file(), name

    config = json.loads((tmp_path / "config.json").read_text())
    tensors = load_file(tmp_path / "model.safetensors")
    assert config["model_type"] == "lite-whisper"
    assert config["architectures"] == ["LiteWhisperForConditionalGeneration"]
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForSpeechSeq2Seq"}
    for i, ranks in enumerate(config["low_rank_config"]):
        for key, rank in ranks.items():
            scope = "self_attn." if key.endswith("_proj") else ""
            prefix = f"model.encoder.layers.{i}.{scope}{key}."
            d_in, d_out = (512, 2048) if key == "fc1" else (2048, 512) if key == "fc2" else (512, 512)
            assert tuple(tensors[prefix + "weight1"].shape) == (d_in, rank)
            assert tuple(tensors[prefix + "weight2"].shape) == (rank, d_out)
            assert tuple(tensors[prefix + "bias"].shape) == (d_out,)
            assert prefix + "weight" not in tensors

    reloaded, info = LiteWhisperForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    original_state = truncated_lite.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original_state[name]), name
    x = features(processor, clips[:2])
    prefix = DECODER_PREFIX.repeat(2, 1)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x, decoder_input_ids=prefix).logits,
                           truncated_lite(x, decoder_input_ids=prefix).logits)
    text = greedy_transcripts(reloaded, processor, clips[:2])
    assert all(isinstance(t, str) for t in text)


def test_published_format_loads_strictly(truncated_lite, tmp_path):
    """A folder as efficient-speech publishes it: two auto_map entries, no custom_pipelines, no processor files."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModel

    state = {k: v.contiguous() for k, v in truncated_lite.state_dict().items() if k != "proj_out.weight"}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = truncated_lite.config.to_dict()
    config.pop("custom_pipelines")
    config.pop("use_triton_kernels")
    config["auto_map"] = {
        "AutoConfig": "configuration_lite_whisper.LiteWhisperConfig",
        "AutoModel": "modeling_lite_whisper.LiteWhisperForConditionalGeneration",
    }
    config["transformers_version"] = "4.49.0"
    (tmp_path / "config.json").write_text(json.dumps(config))

    model, info = LiteWhisperForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.low_rank_config == truncated_lite.config.low_rank_config
    for name, tensor in truncated_lite.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert isinstance(AutoConfig.from_pretrained(tmp_path), LiteWhisperConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), LiteWhisperForConditionalGeneration)


def test_plain_config_behaves_as_whisper(whisper_model):
    config = LiteWhisperConfig(**{k: v for k, v in whisper_model.config.to_dict().items()
                                  if k not in ("model_type", "architectures")})
    assert config.low_rank_config == [{}] * 6 and not config.is_low_rank
    with torch.device("meta"):
        model = LiteWhisperForConditionalGeneration(config)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    assert LiteWhisperConfig(low_rank_config=[{}] * 32, encoder_layers=32).low_rank_config == [{}] * 32


@pytest.mark.parametrize(
    "low_rank_config, message",
    [
        ([{}] * 5, "has 5 entries but the encoder has 6 layers"),
        ([{}, {"fc3": 32}, {}, {}, {}, {}], "encoder layer 1) has unknown key 'fc3'"),
        ([{}, {}, {"q_proj": 0}, {}, {}, {}], "low_rank_config[2]['q_proj'] (encoder layer 2) is 0"),
        ([{}, {}, {}, {"fc1": 513}, {}, {}], "low_rank_config[3]['fc1'] (encoder layer 3) is 513"),
        ([{}, {}, {}, {}, {"v_proj": "32"}, {}], "low_rank_config[4]['v_proj'] (encoder layer 4) must be an integer"),
        ([{}, {}, {}, {}, {}, [32]], "low_rank_config[5] (encoder layer 5) must be a dict"),
        ({"q_proj": 32}, "must be a list with one dict per encoder layer"),
    ],
)
def test_invalid_low_rank_config_names_the_layer(low_rank_config, message):
    with pytest.raises(ValueError) as error:
        LiteWhisperConfig(low_rank_config=low_rank_config, encoder_layers=6, d_model=512, encoder_ffn_dim=2048)
    assert message in str(error.value)


def test_tensors_that_disagree_with_config_name_the_layer(truncated_lite, tmp_path):
    truncated_lite.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())

    # 1. A rank in the config that differs from the stored tensors.
    config["low_rank_config"][2]["fc1"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as error:
        LiteWhisperForConditionalGeneration.from_pretrained(tmp_path)
    assert "encoder layer(s) 2" in str(error.value) and "layers.2.fc1.weight1" in str(error.value)

    # 2. The config says full rank where the checkpoint stores factors.
    del config["low_rank_config"][4]["q_proj"]
    config["low_rank_config"][2]["fc1"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as error:
        LiteWhisperForConditionalGeneration.from_pretrained(tmp_path)
    assert "encoder layer(s) 4" in str(error.value) and "layers.4.self_attn.q_proj" in str(error.value)


def test_build_lite_whisper_rejects_bad_factors(whisper_model):
    w1, w2, b = torch.zeros(512, 16), torch.zeros(16, 512), torch.zeros(512)
    with pytest.raises(ValueError, match="encoder layer 0 fc1"):
        build_lite_whisper(whisper_model, {(0, "fc1"): (w1, w2, b)})
    with pytest.raises(ValueError, match="unknown projection"):
        build_lite_whisper(whisper_model, {(0, "fc3"): (w1, w2, b)})
    with pytest.raises(ValueError, match="layer index out of range"):
        build_lite_whisper(whisper_model, {(6, "q_proj"): (w1, w2, b)})


def test_generate_features(truncated_lite, exact_lite, whisper_model, processor, clips):
    """language/task, prompts, batching with timestamps, bf16, SDPA vs eager, device_map."""
    x = features(processor, clips[:2])
    with torch.no_grad():
        out = exact_lite.generate(x, language="en", task="transcribe", return_timestamps=True)
        ref = whisper_model.generate(x, language="en", task="transcribe", return_timestamps=True)
    assert torch.equal(out, ref)
    decoded = processor.batch_decode(out, decode_with_timestamps=True)
    assert "<|0.00|>" in decoded[0]

    prompt = processor.get_prompt_ids("Dashwood, Norland.", return_tensors="pt")
    with torch.no_grad():
        ours = exact_lite.generate(x[:1], language="en", prompt_ids=prompt)
        reference = whisper_model.generate(x[:1], language="en", prompt_ids=prompt)
    assert torch.equal(ours, reference)

    bf16 = build_lite_whisper(whisper_model.to(torch.bfloat16), exact_factors(whisper_model))
    whisper_model.to(torch.float32)
    assert bf16.dtype == torch.bfloat16
    with torch.no_grad():
        ids = bf16.generate(x[:1].to(torch.bfloat16), language="en")
    assert processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


def test_attention_implementations_and_device_map(truncated_lite, processor, clips, tmp_path):
    truncated_lite.save_pretrained(tmp_path)
    x = features(processor, clips[:1])
    prefix = DECODER_PREFIX
    logits = {}
    for impl in ("eager", "sdpa"):
        model = LiteWhisperForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=impl).eval()
        with torch.no_grad():
            logits[impl] = model(x, decoder_input_ids=prefix).logits
    assert (logits["eager"] - logits["sdpa"]).abs().max().item() < 1e-3
    mapped = LiteWhisperForConditionalGeneration.from_pretrained(tmp_path, device_map="cpu").eval()
    with torch.no_grad():
        assert (mapped(x, decoder_input_ids=prefix).logits - logits["sdpa"]).abs().max().item() < 1e-4
