"""The model contract (tiedlm/models/base.py) and the registry behind ``model.architecture``."""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from tiedlm.config import MODEL_SETTINGS, Config, ModelConfig, apply_overrides, config_from_dict, value_range
from tiedlm.errors import TiedlmError
from tiedlm.models import ARCHITECTURES, LanguageModel, build_model, parameter_count
from tiedlm.models.base import embedding_and_decoder_parameters

FIXTURE = Path(__file__).parent / "fixtures" / "v0_1_run" / "config.json"
OWN = {"rhn": {"depth": 2}, "transformer": {"num_heads": 2, "context_size": 4}}

pytestmark = pytest.mark.usefixtures("one_thread")


def small(architecture: str, **changes) -> ModelConfig:
    settings = {"hidden_size": 8, "output_bias": "on", **OWN.get(architecture, {}), **changes}
    return ARCHITECTURES[architecture].config_class(**settings)


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_every_model_keeps_the_contract(architecture):
    torch.manual_seed(0)
    model = build_model(small(architecture), 13)
    assert isinstance(model, LanguageModel) and model.architecture == architecture
    assert model.output_bias is model.decoder.bias is not None
    tokens = torch.randint(0, 13, (5, 3))
    model.eval()
    with_bias, state = model(tokens, model.init_state(3))
    without, _ = model(tokens, model.init_state(3), include_bias=False)
    assert with_bias.shape == (5, 3, 13) and all(part.size(1) == 3 for part in state)
    torch.testing.assert_close(with_bias, without + model.output_bias)
    hidden, _ = model(tokens, model.init_state(3), decode=False)  # what the trainer's fused decoder + loss reads
    assert hidden.shape == (5, 3, model.decoder.weight.size(1))
    torch.testing.assert_close(model.decode(hidden), with_bias)
    model.train()
    model.use_masks(torch.Generator().manual_seed(1))
    masks = model.window_masks(tokens)
    drawn_ahead, _ = model(tokens, model.init_state(3), masks=masks)
    model.use_masks(torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the Transformer's plain dropout draws from torch's RNG
    drawn_here, _ = model(tokens, model.init_state(3))
    if masks is not None:  # the same masks whether drawn ahead or in forward
        torch.testing.assert_close(drawn_ahead, drawn_here)
    flops = ARCHITECTURES[architecture].forward_flops_per_token(model.config, 13, bptt=5)
    assert flops > 2 * 8 * 13  # at least the decoder


def test_a_saved_flat_table_reads_and_writes_back_unchanged():
    saved = json.loads(FIXTURE.read_text())
    config = config_from_dict(saved, "fixture")
    assert type(config.model) is ModelConfig  # the LSTM's settings are the shared ones
    assert json.dumps(config.to_dict()["model"]) == json.dumps(saved["model"])  # keys, order and values
    for architecture in ARCHITECTURES:  # every architecture writes the whole flat table and reads it back
        written = Config(model=small(architecture)).to_dict()
        assert list(written["model"]) == list(saved["model"])
        assert config_from_dict(written, "written").model == small(architecture)


def test_another_architectures_key_is_refused_unless_at_its_default():
    assert config_from_dict({"model": {"depth": 10, "num_heads": 4}}, "f.toml").model == ModelConfig()
    with pytest.raises(TiedlmError, match=r"^f.toml: unknown key 'model.depth' for model.architecture 'lstm'"):
        config_from_dict({"model": {"depth": 3}}, "f.toml")
    with pytest.raises(TiedlmError, match=r"^f.toml: unknown key 'model.dropout' for model.architecture 'rhn'"):
        config_from_dict({"model": {"architecture": "rhn", "dropout": 0.5}}, "f.toml")
    with pytest.raises(TiedlmError, match=r"^f.toml: unknown key 'model.deptth' \(did you mean 'depth'\?\)"):
        config_from_dict({"model": {"architecture": "rhn", "deptth": 3}}, "f.toml")
    with pytest.raises(TiedlmError, match=r"^--set 'model.depth=x': 'model.depth' must be an integer"):
        apply_overrides({}, ["model.depth=x"])
    with pytest.raises(TiedlmError, match=r"^--set 'model.architecture=foo': 'model.architecture' must be one of"):
        apply_overrides({}, ["model.architecture=foo"])
    merged = apply_overrides({}, ["model.architecture=rhn", "model.depth=3"])
    assert config_from_dict(merged, "f.toml").model.depth == 3


@dataclass
class TinyConfig(ModelConfig):
    architecture: str = "tiny"
    width_factor: int = field(default=1, metadata=value_range(1))


class TinyModel(LanguageModel):
    """A bag-of-embeddings model: the least a new architecture writes."""

    architecture = "tiny"
    config_class = TinyConfig

    def __init__(self, config: TinyConfig, vocab_size: int):
        super().__init__(config)
        self.embedding = nn.Embedding(vocab_size, config.hidden_size)
        self.decoder = nn.Linear(config.hidden_size, vocab_size, bias=config.has_output_bias())
        if config.tie_weights:
            self.decoder.weight = self.embedding.weight

    def init_state(self, batch_size):
        return (self.embedding.weight.new_zeros(1, batch_size, 1),)

    def features(self, tokens, state, *, masks=None):
        return self.embedding(tokens), state

    @classmethod
    def parameter_count(cls, config, vocab_size):
        return embedding_and_decoder_parameters(config, vocab_size)


def test_a_registered_architecture_is_a_config_choice_with_its_own_keys(monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "tiny", TinyModel)
    monkeypatch.setitem(MODEL_SETTINGS, "tiny", TinyConfig)  # what @register("tiny") would add
    config = config_from_dict({"model": {"architecture": "tiny", "width_factor": 2, "hidden_size": 4}}, "t.toml")
    assert config.model == TinyConfig(hidden_size=4, width_factor=2)
    assert config.to_dict()["model"]["width_factor"] == 2
    model = build_model(config.model, 7)
    assert isinstance(model, TinyModel) and parameter_count(config.model, 7) == sum(
        p.numel() for p in model.parameters()
    )
    with pytest.raises(TiedlmError, match="unknown key 'model.width_factor' for model.architecture 'lstm'"):
        config_from_dict({"model": {"width_factor": 2}}, "t.toml")


def test_a_model_with_its_own_forward_trains_through_its_logits():
    """A model written before ``features`` (it overrides forward): the step uses its logits as they are."""
    from tiedlm.config import Config
    from tiedlm.training.step import TrainingStep, make_optimizer

    class OwnForward(TinyModel):
        def forward(self, tokens, state, *, include_bias=True, masks=None):
            return self.decode(self.embedding(tokens), include_bias=include_bias) * 2, state

    config = Config()
    config.model = TinyConfig(hidden_size=4, tie_weights=True, output_bias="on")
    config.loss.augmented = False
    model = OwnForward(config.model, 7)
    step = TrainingStep(model, make_optimizer(model, config.train), config)
    assert not step.fused_decoder
    tokens = torch.randint(0, 7, (3, 2))
    ce, _, _ = step.window_loss(tokens, tokens, model.init_state(2))
    expected = torch.nn.functional.cross_entropy(
        model(tokens, None)[0].flatten(0, 1), tokens.flatten(), reduction="none"
    )
    torch.testing.assert_close(ce, expected)


def test_a_plain_model_config_builds_any_architecture_at_its_defaults():
    plain = ModelConfig(architecture="rhn", hidden_size=6)
    model = build_model(plain, 9)
    assert dataclasses.asdict(model.config) == dataclasses.asdict(
        small("rhn", hidden_size=6, depth=10, output_bias="auto")
    )


def test_a_settings_class_must_default_to_its_own_architecture():
    @dataclass
    class ForgetfulConfig(ModelConfig):  # architecture left at the shared default, "lstm"
        width: int = 3

    class Forgetful(LanguageModel):
        config_class = ForgetfulConfig

    from tiedlm.models.base import register

    with pytest.raises(TypeError, match=r"ForgetfulConfig needs `architecture: str = 'forgetful'`"):
        register("forgetful")(Forgetful)
    assert "forgetful" not in ARCHITECTURES and "forgetful" not in MODEL_SETTINGS
