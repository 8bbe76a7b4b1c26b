"""FedScale job-file parsing and validation."""

from __future__ import annotations

import pytest

from fedscaled.core.config import JOB_KEYS, JobConfig, nearest_key, parse_job_text
from fedscaled.errors import InvalidConfig


def parse(body: str) -> JobConfig:
    return parse_job_text("job_conf:\n" + body)


def test_defaults_follow_fedscale() -> None:
    config = parse("  - job_name: x\n")
    assert config["rounds"] == 50
    assert config["num_participants"] == 4
    assert config["overcommitment"] == 1.3
    assert config["learning_rate"] == 0.05
    assert config["decay_factor"] == 0.98
    assert config["eval_interval"] == 5
    assert config["filter_less"] == 32
    assert config.selected_per_round == 5
    assert config.min_participants == 2


def test_plain_mapping_and_shape_parsing() -> None:
    config = parse_job_text("job_conf:\n  job_name: y\n  input_shape: 32 32 3\n  filter_more: 1e15\n")
    assert config["input_shape"] == (32, 32, 3)
    assert config["filter_more"] == 10**15
    assert JobConfig.from_record(config.to_record()) == config


def test_async_mode_from_aggregator_entry() -> None:
    config = parse_job_text("aggregator_entry: aggregation/async_aggregator.py\njob_conf:\n  - job_name: z\n")
    assert config.mode == "async"
    assert "aggregator_entry" in config.ignored


@pytest.mark.parametrize(("body", "message"), [
    ("  - rounds: 0\n", "rounds must be a positive integer, got 0"),
    ("  - rounds: 2.5\n", "rounds must be an integer, got 2.5"),
    ("  - overcommitment: 0.5\n", "overcommitment must be at least 1, got 0.5"),
    ("  - model: resnet\n", "model must be one of linear, mlp, cnn, mobilenetv3, mobilenetv3_finetune, got 'resnet'"),
    ("  - require_charging: maybe\n", "require_charging must be true or false"),
    ("  - job_name: 'bad name'\n", "job_name must be"),
    ("  - rounds: 3\n  - rounds: 4\n", "given twice"),
    ("  - [1, 2]\n", "single-key map"),
    ("  - learning_rate: .nan\n", "learning_rate must be a finite number"),
    ("  - filter_less: 10\n  - filter_more: 5\n", "filter_more (5) must not be below filter_less (10)"),
])
def test_rejections_name_the_problem(body: str, message: str) -> None:
    with pytest.raises(InvalidConfig) as info:
        parse(body)
    assert message in info.value.message


def test_unknown_keys_suggest_nearest() -> None:
    with pytest.raises(InvalidConfig, match=r"'learn_rate' \(did you mean learning_rate\?\)"):
        parse("  - learn_rate: 0.1\n")
    with pytest.raises(InvalidConfig, match="unknown top-level key 'ps_ipp'"):
        parse_job_text("ps_ipp: x\njob_conf:\n  - job_name: q\n")
    assert nearest_key("num_participant") == "num_participants"
    assert nearest_key("zzzzzzzz") is None


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "job_conf: 3\n", "rounds: 3\n"])
def test_not_a_job_file(text: str) -> None:
    with pytest.raises(InvalidConfig):
        parse_job_text(text)


def test_enrollment_token_generated_unless_given() -> None:
    a, b = parse("  - job_name: x\n"), parse("  - job_name: x\n")
    assert a["enrollment_token"] != b["enrollment_token"]
    assert parse("  - enrollment_token: s3cret\n")["enrollment_token"] == "s3cret"


def test_vars_are_not_expanded() -> None:
    config = parse_job_text("exp_path: $HOME/x\njob_conf:\n  - log_path: $FEDSCALE_HOME/b\n")
    assert config["log_path"] == "$FEDSCALE_HOME/b"


def test_every_key_has_a_doc() -> None:
    assert all(spec.doc for spec in JOB_KEYS.values())


FEDSCALE_STYLE = """\
use_container: True
ports: 29500
container_network: fedscale-network
data_path: $FEDSCALE_HOME/benchmark
num_aggregators: 1
num_executors: 2
auth:
    ssh_user: ""
setup_commands:
    - source $HOME/anaconda3/bin/activate fedscale
job_conf:
    - job_name: femnist
    - experiment_mode: deployment
    - data_set: femnist
    - model: {model}
    - input_shape: 1 3 28 28
    - use_cuda: True
    - save_checkpoint: True
    - model_retention: 3
    - num_loaders: 4
    - malicious_factor: 4
"""


def test_fedscale_launcher_keys_and_ignored_scalars_are_accepted() -> None:
    config = parse_job_text(FEDSCALE_STYLE.format(model="mlp"))
    assert config["num_classes"] == 62  # femnist, as FedScale's config_parser maps it
    assert config["input_shape"] == (28, 28, 3)  # batch, channels, height, width
    assert config["model_retention"] == 0  # save_checkpoint keeps every version
    for key in ("use_container", "ports", "container_network", "num_aggregators", "use_cuda", "num_loaders"):
        assert key in config.ignored
    assert "save_checkpoint" not in config.ignored and "data_set" not in config.ignored


def test_a_fedscale_file_is_refused_for_its_model_not_for_launcher_keys() -> None:
    with pytest.raises(InvalidConfig) as info:
        parse_job_text(FEDSCALE_STYLE.format(model="resnet18"))
    assert "model must be one of" in info.value.message and "resnet18" in info.value.message
    with pytest.raises(InvalidConfig) as info:
        parse_job_text(FEDSCALE_STYLE.format(model="mlp").replace("deployment", "simulation"))
    assert "simulator" in info.value.message


def test_explicit_num_classes_wins_over_data_set() -> None:
    text = FEDSCALE_STYLE.format(model="mlp").replace("    - data_set: femnist\n",
                                                      "    - data_set: femnist\n    - num_classes: 10\n")
    assert parse_job_text(text)["num_classes"] == 10


POLICY_FILE = """\
ps_ip: localhost
exp_path: $FEDSCALE_HOME/fedscale/cloud
{entry}job_conf:
  - job_name: {name}
  - model: {model}
  - gradient_policy: {policy}  # {{"fed-yogi", "fed-prox", "fed-avg"}}
  - yogi_eta: 3e-3
  - yogi_tau: 1e-8
  - yogi_beta: 0.9
  - yogi_beta2: 0.99
  - proxy_mu: 0.1
  - qfed_q: 1.0
  - eval_interval: 30
  - use_cuda: False
"""


@pytest.mark.parametrize("policy", ["fed-yogi", "yogi", "fed-prox", "prox", "q-fedavg", "qfedavg", "fed-avg"])
def test_fedscale_files_naming_a_policy_are_refused_for_their_model_never_the_policy(policy: str) -> None:
    from fedscaled.core.strategies import canonical

    text = POLICY_FILE.format(entry="", name="bench", model="resnet34", policy=policy)
    with pytest.raises(InvalidConfig) as refused:
        parse_job_text(text)
    assert refused.value.details.get("key") == "model", refused.value
    config = parse_job_text(POLICY_FILE.format(entry="", name="bench", model="cnn", policy=policy))
    assert config["gradient_policy"] == policy and canonical(policy) in ("fed-yogi", "fed-prox", "q-fedavg",
                                                                         "fed-avg")
    assert config.mode == "sync"


def test_fedbuff_file_runs_in_async_mode() -> None:
    text = POLICY_FILE.format(entry="aggregator_entry: aggregation/async_aggregator.py\n", name="fedbuff",
                                 model="cnn", policy="fed-yogi")
    config = parse_job_text(text)
    assert config.mode == "async"
    assert config["max_staleness"] == 5 and config["async_buffer"] == 0


def test_strategy_combinations_that_cannot_work_are_refused_with_the_key() -> None:
    base = "job_conf:\n  - job_name: j\n"
    cases = {
        "  - gradient_policy: q-fedavg\n  - aggregator: median\n": "aggregator",
        "  - noise_multiplier: 1.0\n  - weighting: uniform\n": "noise_multiplier",
        "  - noise_multiplier: 1.0\n  - clip_norm: 1.0\n": "weighting",
        "  - noise_multiplier: 1.0\n  - clip_norm: 1.0\n  - weighting: uniform\n  - aggregator: median\n":
            "noise_multiplier",
    }
    for extra, key in cases.items():
        with pytest.raises(InvalidConfig) as refused:
            parse_job_text(base + extra)
        assert refused.value.details.get("key") == key, (extra, refused.value)
    ok = parse_job_text(base + "  - noise_multiplier: 1.0\n  - clip_norm: 1.0\n  - weighting: uniform\n")
    assert ok["noise_multiplier"] == 1.0
