"""Config loading: defaults, discovery, validation messages, key variables."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pydantic
import pytest

from pipeline.config import Config, ProviderConfig, api_key, load_config
from pipeline.errors import ConfigError, UsageError
from pipeline.yamlsrc import load_yaml_with_lines, validation_error_message


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


# --------------------------------------------------------------------------- defaults


def test_builtin_defaults_when_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None)
    assert config.source == "built-in defaults"
    ailab = config.provider("ailab")
    assert ailab.base_url == "https://www.ailabapi.com"
    assert ailab.api_key_env == "AILAB_API_KEY"
    assert ailab.rate_limit is None  # no published budget: docs/vendors.md "AILab: rate limits"
    pc = config.provider("perfectcorp")
    assert pc.base_url == "https://yce-api-01.makeupar.com"
    assert pc.rate_limit is not None
    assert (pc.rate_limit.requests, pc.rate_limit.per_seconds, pc.rate_limit.qps) == (250, 300, 5)
    assert config.retry.backoff_initial_seconds == 1.0
    assert config.retry.backoff_max_seconds == 60.0
    assert config.timeouts.connect_seconds == 10.0
    assert config.timeouts.request_seconds == 120.0


def test_discovers_config_yaml_in_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "retry: {backoff_initial_seconds: 0.5}\n")
    monkeypatch.chdir(tmp_path)
    config = load_config(None)
    assert config.retry.backoff_initial_seconds == 0.5
    assert config.source.endswith("config.yaml")


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "# nothing yet\n"))
    assert config.provider("ailab").base_url == "https://www.ailabapi.com"
    assert config.source == str(tmp_path / "config.yaml")


def test_partial_provider_section_keeps_other_defaults(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
            providers:
              perfectcorp:
                base_url: http://127.0.0.1:9999
                poll_interval_seconds: 0.01
            timeouts:
              request_seconds: 30
            """,
        )
    )
    pc = config.provider("perfectcorp")
    assert pc.base_url == "http://127.0.0.1:9999"
    assert pc.poll_interval_seconds == 0.01
    assert pc.api_key_env == "PERFECTCORP_API_KEY"
    assert pc.rate_limit is not None and pc.rate_limit.qps == 5
    assert config.provider("ailab").base_url == "https://www.ailabapi.com"
    assert config.timeouts.request_seconds == 30.0
    assert config.timeouts.connect_seconds == 10.0


def test_partial_rate_limit_keeps_the_other_published_keys(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
            providers:
              perfectcorp:
                rate_limit: {qps: 3}
              ailab:
                rate_limit: {qps: 8}
            """,
        )
    )
    pc = config.provider("perfectcorp").rate_limit
    assert pc is not None and (pc.requests, pc.per_seconds, pc.qps) == (250, 300, 3)
    ailab = config.provider("ailab").rate_limit
    assert ailab is not None and (ailab.requests, ailab.qps) == (None, 8)


def test_rate_limit_null_removes_the_limit(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "providers: {perfectcorp: {rate_limit: null}}\n"))
    assert config.provider("perfectcorp").rate_limit is None


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "{}\n"))
    with pytest.raises(pydantic.ValidationError):
        config.retry.backoff_max_seconds = 3


# ----------------------------------------------------------------------------- errors


def test_explicit_missing_file(tmp_path: Path) -> None:
    msg = error_of(tmp_path / "nope.yaml")
    assert "nope.yaml: config file not found" in msg


def test_unknown_key_names_line_and_lists_known(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        providers:
          ailab:
            base_url: https://x
            api_key: secret
        """,
    )
    msg = error_of(path)
    assert msg.startswith(f"{path}:4: providers.ailab.api_key: unknown key")
    assert "api_key_env" in msg and "base_url" in msg


def test_unknown_provider(tmp_path: Path) -> None:
    path = write(tmp_path, "providers:\n  openai:\n    base_url: x\n")
    msg = error_of(path)
    assert f"{path}:2: providers.openai: not an allowed key" in msg
    assert "'ailab' or 'perfectcorp'" in msg
    assert len(msg.splitlines()) == 1  # no follow-up noise about the bad section


def test_unknown_top_level_key(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, "retry: {}\nconcurrency: 3\n"))
    assert ":2: concurrency: unknown key; known keys: " in msg
    assert "providers" in msg and "timeouts" in msg


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("timeouts: {connect_seconds: 0}", ":1: timeouts.connect_seconds: input should be"),
        ("timeouts: {connect_seconds: '5'}", "valid number (got '5')"),
        ("timeouts: {connect_seconds: true}", "valid number (got true)"),
        ("retry: {backoff_max_seconds: -2}", "greater than or equal to 0 (got -2)"),
        ("retry: 5", ":1: retry: expected a mapping"),
        ("providers: {ailab: {rate_limit: {requests: 0}}}", "providers.ailab.rate_limit.requests"),
        ("providers: {ailab: {poll_interval_seconds: fast}}", "valid number (got 'fast')"),
    ],
)
def test_value_errors(tmp_path: Path, text: str, needle: str) -> None:
    msg = error_of(write(tmp_path, text + "\n"))
    assert needle in msg
    assert "https://errors.pydantic.dev" not in msg


def test_several_problems_one_line_each_in_file_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        timeouts:
          request_seconds: -1
        retry:
          backoff_initial_seconds: x
        """,
    )
    lines = error_of(path).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}:2: timeouts.request_seconds: ")
    assert lines[1].startswith(f"{path}:4: retry.backoff_initial_seconds: ")


def test_not_a_mapping(tmp_path: Path) -> None:
    assert ":1: (top level): the config must be a mapping" in error_of(write(tmp_path, "- a\n"))


def test_yaml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "retry:\n  backoff_initial_seconds: 1\n bad: [\n")
    msg = error_of(path)
    assert msg.startswith(f"{path}:")
    assert "invalid YAML" in msg


def test_duplicate_key(tmp_path: Path) -> None:
    path = write(tmp_path, "retry: {}\ntimeouts: {}\nretry: {}\n")
    assert f"{path}:3: retry: duplicate key (first given on line 1)" in error_of(path)


def test_config_error_exits_2(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        load_config(write(tmp_path, "nope: 1\n"))
    assert info.value.exit_code == 2


# ---------------------------------------------------------------------------- api keys


def test_api_key_from_named_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(write(tmp_path, "providers: {ailab: {api_key_env: MY_AILAB}}\n"))
    monkeypatch.setenv("MY_AILAB", "  k-123 \n")
    assert api_key(config, "ailab") == "k-123"


def test_missing_key_variable_names_it_and_mentions_emulate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PERFECTCORP_API_KEY", raising=False)
    with pytest.raises(ConfigError) as info:
        api_key(Config(), "perfectcorp")
    msg = str(info.value)
    assert "PERFECTCORP_API_KEY" in msg
    assert "--emulate" in msg


def test_blank_key_variable_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AILAB_API_KEY", "   ")
    with pytest.raises(ConfigError, match="AILAB_API_KEY"):
        api_key(Config(), "ailab")


# ------------------------------------------------------------------------ yamlsrc


def test_line_of_key_paths(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        a: 1
        operations:
          - op: x
            params:
              smoothing: 3
          - op: y
            params:
              list:
                - p
                - q
        """,
    )
    doc = load_yaml_with_lines(path, ConfigError)
    assert doc.data["operations"][1]["params"]["list"] == ["p", "q"]
    assert doc.line_of(("a",)) == 1
    assert doc.line_of(("operations", 0, "params", "smoothing")) == 5
    assert doc.line_of(("operations", 1)) == 6
    assert doc.line_of(("operations", 1, "params", "list", 1)) == 10
    # Missing paths fall back to the deepest existing ancestor.
    assert doc.line_of(("operations", 1, "params", "nope")) == 7
    assert doc.line_of(("operations", 7)) == 2
    assert doc.line_of(("zzz",)) == 1


def test_yaml_data_matches_safe_load(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        base: &b {x: 1, y: 2}
        derived:
          <<: *b
          y: 3
        when: 2026-11-01
        flag: yes
        """,
    )
    import yaml

    doc = load_yaml_with_lines(path, ConfigError)
    assert doc.data == yaml.safe_load(path.read_text())
    assert doc.data["derived"] == {"x": 1, "y": 3}


def test_yaml_refuses_unsafe_tags_and_multiple_documents(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_yaml_with_lines(write(tmp_path, "a: !!python/object:os.system {}\n"), ConfigError)
    with pytest.raises(ConfigError, match=r":\d+: invalid YAML"):
        load_yaml_with_lines(write(tmp_path, "a: 1\n---\nb: 2\n"), ConfigError)


def test_yaml_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"a: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_yaml_with_lines(path, ConfigError)


def test_validation_error_message_format(tmp_path: Path) -> None:
    class Inner(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", strict=True)
        n: int

    class Outer(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", strict=True)
        items: list[Inner]

    path = write(tmp_path, "items:\n  - n: 1\n  - n: two\n    extra: 1\n")
    doc = load_yaml_with_lines(path, ConfigError)
    with pytest.raises(pydantic.ValidationError) as info:
        Outer.model_validate(doc.data)
    msg = validation_error_message(path, doc, info.value, model=Outer)
    assert msg.splitlines() == [
        f"{path}:3: items[1].n: input should be a valid integer (got 'two')",
        f"{path}:4: items[1].extra: unknown key; known keys: n",
    ]


# --------------------------------------------------------------- config.example.yaml

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.yaml"


def test_example_config_is_exactly_the_builtin_defaults() -> None:
    # Its header promises "every value below IS the built-in default".
    example = load_config(EXAMPLE)
    assert example.source == str(EXAMPLE)
    assert example.model_dump(exclude={"source"}) == Config().model_dump(exclude={"source"})


def _settings(model: type[pydantic.BaseModel], prefix: str = "") -> list[str]:
    out: list[str] = []
    for name, info in model.model_fields.items():
        if name == "source":
            continue
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, pydantic.BaseModel):
            out.extend(_settings(kind, f"{prefix}{name}."))
        else:
            out.append(f"{prefix}{name}")
    return out


def test_example_config_documents_every_setting() -> None:
    import yaml

    data = yaml.safe_load(EXAMPLE.read_text())

    def has(path: str, node: object) -> bool:
        for step in path.split("."):
            if not isinstance(node, dict) or step not in node:
                return False
            node = node[step]
        return True

    top = [s for s in _settings(Config) if s != "providers"]
    provider_keys = [
        f"providers.{vendor}.{key}"
        for vendor in ("ailab", "perfectcorp")
        for key in _settings(ProviderConfig)
    ]
    missing = [s for s in [*top, *provider_keys] if not has(s, data)]
    assert missing == []


# ------------------------------------------------------------------- newer settings


def test_allow_result_hosts_from_a_yaml_list(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
            network:
              allow_result_hosts: ["Storage.Internal:9000", "127.0.0.1:8080", "[::1]:443"]
            """,
        )
    )
    assert config.network.allow_result_hosts == (
        "storage.internal:9000",
        "127.0.0.1:8080",
        "[::1]:443",
    )
    assert load_config(write(tmp_path, "network: {allow_result_hosts: null}\n")).network == (
        Config().network
    )


def test_reporting_section(tmp_path: Path) -> None:
    assert (Config().reporting.reports_keep, Config().reporting.progress_interval_seconds) == (
        30,
        10.0,
    )
    config = load_config(write(tmp_path, "reporting: {reports_keep: 3}\n"))
    assert (config.reporting.reports_keep, config.reporting.progress_interval_seconds) == (3, 10.0)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8765",
        "https://www.ailabapi.com/",
        "https://gateway.example.com:8443/ailab",
        "HTTPS://EXAMPLE.COM",
    ],
)
def test_base_urls_that_are_fine(tmp_path: Path, url: str) -> None:
    config = load_config(write(tmp_path, f"providers: {{ailab: {{base_url: '{url}'}}}}\n"))
    assert config.provider("ailab").base_url == url


@pytest.mark.parametrize("name", ["AILAB_API_KEY", "_KEY", "K2", "MY_AILAB_KEY_2"])
def test_env_names_that_are_fine(tmp_path: Path, name: str) -> None:
    config = load_config(write(tmp_path, f"providers: {{ailab: {{api_key_env: {name}}}}}\n"))
    assert config.provider("ailab").api_key_env == name


def test_source_is_the_resolved_path(tmp_path: Path) -> None:
    real = write(tmp_path, "retry: {}\n", name="real.yaml")
    (tmp_path / "sub").mkdir()
    link = tmp_path / "sub" / "cfg.yaml"
    link.symlink_to(real)
    assert load_config(tmp_path / "sub" / ".." / "sub" / "cfg.yaml").source == str(real)
    assert Config().source == "built-in defaults"


def test_missing_key_names_the_config_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "providers:\n  ailab:\n    api_key_env: MY_AILAB\n")
    monkeypatch.delenv("MY_AILAB", raising=False)
    monkeypatch.delenv("PERFECTCORP_API_KEY", raising=False)
    config = load_config(path)
    with pytest.raises(ConfigError) as info:
        api_key(config, "ailab")
    assert str(info.value).startswith(
        f"{path}:3: providers.ailab.api_key_env: environment variable MY_AILAB is not set;"
    )
    with pytest.raises(ConfigError) as info:
        api_key(config, "perfectcorp")
    assert str(info.value).startswith(f"{path}: providers.perfectcorp.api_key_env (default): ")
    with pytest.raises(ConfigError) as info:
        api_key(Config(), "perfectcorp")
    assert str(info.value).startswith("providers.perfectcorp.api_key_env (built-in default): ")


@pytest.mark.parametrize("kind", ["folder", "broken-link", "fifo"])
def test_a_default_config_that_is_not_a_file_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    target = tmp_path / "config.yaml"
    if kind == "folder":
        target.mkdir()
    elif kind == "broken-link":
        target.symlink_to(tmp_path / "gone.yaml")
    else:
        os.mkfifo(target)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(None)
    expected = {
        "folder": "is a folder",
        "broken-link": "config is a link to nothing",
        "fifo": "is not a regular file (a FIFO)",
    }[kind]
    assert expected in str(info.value)


def test_rate_limit_empty_mapping_keeps_the_published_limit(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "providers: {perfectcorp: {rate_limit: {}}}\n"))
    assert config.provider("perfectcorp").rate_limit == Config().provider("perfectcorp").rate_limit


def test_link_local_may_be_built_in_code_but_not_loaded(tmp_path: Path) -> None:
    # The fetcher refuses it anyway (tests build such configs to prove that); a file
    # listing it is told at once.
    from pipeline.config import NetworkConfig

    assert NetworkConfig(allow_result_hosts=("169.254.169.254:80",)).allow_result_hosts == (
        "169.254.169.254:80",
    )
    path = write(tmp_path, "network:\n  allow_result_hosts:\n    - '169.254.169.254:80'\n")
    assert f"{path}:3: network.allow_result_hosts[0]: '169.254.169.254:80': link-local" in (
        error_of(path)
    )
