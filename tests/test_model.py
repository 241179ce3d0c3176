"""AttentionLSTM and the video-level MLP: shapes, masking, configs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.attention_lstm import AttentionLSTM
from model.config import Config, ConfigError, load_config
from model.networks import build_model, loss_fn
from storage.formats.yt8m_spec import dequantize


def _tiny(**overrides) -> Config:
    values = {"embedding_size": 8, "lstm_size": 6, "head_sizes": (16, 12), "num_classes": 20, "drop_rate": 0.5}
    return load_config("small", overrides={**values, **overrides})


def test_seed_preset_carries_the_model_card_values():
    config = load_config("seed")
    assert (config.embedding_size, config.lstm_size, config.drop_rate, config.num_classes) == (512, 1024, 0.5, 3862)
    assert (config.max_frames, config.batch_size, config.head_sizes) == (300, 1024, (8192, 4096))
    assert (config.optimizer, config.learning_rate, config.lr_decay_epochs, config.weight_decay) == (
        "rmsprop_centered",
        1e-3,
        (5,),
        8e-4,
    )


def test_seed_architecture_shapes():
    model = AttentionLSTM(load_config("seed"))
    assert model.rgb.embed.in_features == 1024 and model.audio.embed.in_features == 128
    assert model.rgb.lstm.hidden_size == 1024 and model.rgb.lstm.bidirectional
    assert model.rgb.attention.in_features == 2048
    linears = [m for m in model.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(4096, 8192), (8192, 4096), (4096, 3862)]


def test_output_shape_and_padding_changes_nothing():
    torch.manual_seed(0)
    model = build_model(_tiny()).eval()
    rgb, audio = torch.randn(3, 12, 1024), torch.randn(3, 12, 128)
    mask = torch.zeros(3, 12, dtype=torch.bool)
    for i, n in enumerate((12, 5, 1)):
        mask[i, :n] = True
    logits = model(rgb, audio, mask)
    assert logits.shape == (3, 20)

    garbage_rgb, garbage_audio = rgb.clone(), audio.clone()
    garbage_rgb[~mask] = 123.0
    garbage_audio[~mask] = -7.0
    assert torch.allclose(model(garbage_rgb, garbage_audio, mask), logits, atol=1e-6)
    # The same video alone, without any padding, scores the same.
    alone = model(rgb[1:2, :5], audio[1:2, :5], mask[1:2, :5])
    assert torch.allclose(alone, logits[1:2], atol=1e-5)
    longer = model(
        torch.cat([rgb, torch.zeros(3, 8, 1024)], 1),
        torch.cat([audio, torch.zeros(3, 8, 128)], 1),
        torch.cat([mask, torch.zeros(3, 8, dtype=torch.bool)], 1),
    )
    assert torch.allclose(longer, logits, atol=1e-5)


def test_video_level_mlp_shapes():
    model = build_model(load_config("video", "video", overrides={"hidden_size": 32, "num_classes": 20})).eval()
    assert model(torch.randn(4, 1024), torch.randn(4, 128)).shape == (4, 20)


def _video(**overrides) -> Config:
    return load_config(
        "video",
        "video",
        overrides={"hidden_size": 32, "num_classes": 20, "ensemble_size": 1, "chain_size": 0, **overrides},
    )


def test_video_level_variants_are_the_starters_models():
    layers = lambda model: [type(m).__name__ for m in model.net]  # noqa: E731
    assert layers(build_model(_video())) == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    assert layers(build_model(_video(batch_norm=False))) == ["Linear", "ReLU", "Dropout", "Linear"]
    logistic = build_model(_video(hidden_size=0))
    assert layers(logistic) == ["Linear"] and logistic.net[0].in_features == 1024 + 128
    assert logistic(torch.randn(3, 1024), torch.randn(3, 128)).shape == (3, 20)
    # batch_norm is part of the weights' architecture only where there is a hidden layer to normalise.
    assert _video(batch_norm=False).architecture() != _video().architecture()
    assert _video(hidden_size=0, batch_norm=False).architecture() == _video(hidden_size=0).architecture()
    with pytest.raises(ConfigError, match="hidden_size must be a positive integer"):
        _tiny(hidden_size=0)


def test_input_dropout_acts_in_training_only_and_holds_no_weights():
    torch.manual_seed(0)
    plain, dropped = build_model(_video()), build_model(_video(input_drop_rate=0.5))
    assert plain.state_dict().keys() == dropped.state_dict().keys()  # loads either way, as fine-tuning needs
    dropped.load_state_dict(plain.state_dict())
    rgb, audio = torch.randn(8, 1024), torch.randn(8, 128)
    plain.eval(), dropped.eval()
    assert torch.equal(plain(rgb, audio), dropped(rgb, audio))
    dropped.train(), plain.train()
    features = []
    dropped.net[0].register_forward_hook(lambda module, args, out: features.append(args[0]))
    dropped(rgb, audio)
    zeroed = (features[0] == 0).float().mean().item()
    assert 0.4 < zeroed < 0.6


def test_dequantize_matches_reference():
    q = torch.tensor([0, 128, 255], dtype=torch.uint8)
    assert torch.allclose(dequantize(q.float()), q.double().mul(4 / 255).add(4 / 512 - 2).float())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"epochs": -1}, "epochs must be a positive integer"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"max_frames": 301}, "max_frames must be at most 300"),
        ({"drop_rate": 1.0}, "drop_rate must be in"),
        ({"input_drop_rate": -0.1}, "input_drop_rate must be in"),
        ({"lr_schedule": "linear"}, "lr_schedule must be one of step, cosine, not 'linear'"),
    ],
)
def test_bad_config_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("small", overrides=overrides)


def test_unknown_preset_and_level_mismatch():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_config("huge")
    with pytest.raises(ConfigError, match="is for level 'frame', not 'video'"):
        load_config("small", "video")


def test_default_preset_depends_on_level_and_device():
    assert load_config(None, "frame", cuda=True).preset == "seed"
    assert load_config(None, "frame", cuda=False).preset == "small"
    assert load_config(None, "video").preset == "video"


def test_video_ensemble_trains_members_apart_and_scores_their_mean_probability():
    torch.manual_seed(0)
    ensemble = build_model(_video(ensemble_size=3))
    single = build_model(_video(ensemble_size=1))
    assert [type(m).__name__ for m in ensemble.members] == ["VideoMLP"] * 3
    first, second = (m.net[0].weight for m in ensemble.members[:2])
    assert not torch.equal(first, second)  # independently initialised
    assert all(m.net[-1].bias.eq(-7.0).all() for m in ensemble.members)  # each starts at the label prior
    assert _video(ensemble_size=3).architecture() != _video(ensemble_size=1).architecture()
    assert _video(ensemble_size=3).architecture() == _video(ensemble_size=3).architecture()
    assert sum(p.numel() for p in ensemble.parameters()) == 3 * sum(p.numel() for p in single.parameters())

    rgb, audio = torch.randn(5, 1024), torch.randn(5, 128)
    stacked = ensemble.train()(rgb, audio)
    assert stacked.shape == (3, 5, 20)
    labels = (torch.rand(5, 20) < 0.2).float()
    # Each member's own loss, averaged: the gradient a member gets is that of a run of its own.
    assert torch.allclose(loss_fn(stacked, labels), sum(loss_fn(s, labels) for s in stacked) / 3)

    ensemble.eval()
    members = torch.stack([m(rgb, audio) for m in ensemble.members])
    expected = torch.logit(torch.sigmoid(members.double()).mean(0)).float()
    assert torch.allclose(ensemble(rgb, audio), expected, atol=1e-4)
    # Members certain either way (p rounds to 0 or 1 in float32) still give finite logits of the mean.
    for member, bias in zip(ensemble.members, (60.0, -60.0, 0.0)):
        nn.init.zeros_(member.net[-1].weight), nn.init.constant_(member.net[-1].bias, bias)
    extreme = ensemble(rgb, audio)
    assert torch.isfinite(extreme).all()
    assert torch.allclose(torch.sigmoid(extreme), torch.full_like(extreme, (1 + 0 + 0.5) / 3), atol=1e-6)


def test_chained_mlp_trains_both_stages_and_scores_with_the_second():
    torch.manual_seed(0)
    chained = build_model(_video(chain_size=8))
    assert chained.chain_projection.in_features == 20 and chained.chained[0].in_features == 1024 + 128 + 8
    assert chained.net[-1].bias.eq(-7.0).all() and chained.chained[-1].bias.eq(-7.0).all()
    assert _video(chain_size=8).architecture() != _video().architecture()
    rgb, audio = torch.randn(5, 1024), torch.randn(5, 128)
    labels = (torch.rand(5, 20) < 0.2).float()

    stages = chained.train()(rgb, audio)
    assert stages.shape == (2, 5, 20)
    # Each stage learns from the labels in full: the loss is the two stages' losses summed.
    assert torch.allclose(loss_fn(stages, labels, stages=2), loss_fn(stages[0], labels) + loss_fn(stages[1], labels))
    loss_fn(stages, labels, stages=2).backward()
    assert chained.net[0].weight.grad.abs().sum() > 0 and chained.chain_projection.weight.grad.abs().sum() > 0

    chained.eval()
    features = torch.cat([F.normalize(rgb, dim=1), F.normalize(audio, dim=1)], dim=1)
    first = chained.net(features)
    second = chained.chained(torch.cat([features, chained.chain_projection(torch.sigmoid(first))], dim=1))
    assert torch.allclose(chained(rgb, audio), second, atol=1e-5)  # scoring: the second stage's logits

    # In an ensemble: (members, stages, B, C), members averaged and stages summed.
    ensemble = build_model(_video(chain_size=8, ensemble_size=3)).train()
    stacked = ensemble(rgb, audio)
    assert stacked.shape == (3, 2, 5, 20)
    expected = sum(loss_fn(member, labels, stages=2) for member in stacked) / 3
    assert torch.allclose(loss_fn(stacked, labels, stages=2), expected)
    assert ensemble.eval()(rgb, audio).shape == (5, 20)


def test_chain_size_is_checked():
    with pytest.raises(ConfigError, match="chain_size must be an integer >= 0 .0: no second stage., not -1"):
        _video(chain_size=-1)
    with pytest.raises(ConfigError, match="chain_size applies to video level only"):
        _tiny(chain_size=8)


def test_ensemble_size_is_checked():
    with pytest.raises(ConfigError, match="ensemble_size must be a positive integer, not 0"):
        _video(ensemble_size=0)
    with pytest.raises(ConfigError, match="ensemble_size applies to video level only"):
        _tiny(ensemble_size=2)
