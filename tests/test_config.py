"""Configuration: flags beat the environment, which beats the defaults."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from asgilook_aiohttp.config import Config


def test_defaults(tmp_path: Path) -> None:
    config = Config.from_sources([], {"HOME": str(tmp_path)})
    assert (config.host, config.port) == ("127.0.0.1", 8000)
    assert config.storage_path == tmp_path / ".local" / "share" / "asgilook-aiohttp"
    assert config.max_upload_bytes == 32 * 1024 * 1024
    assert config.max_pixels == 50_000_000
    assert config.min_thumbnail_side == 64
    assert config.workers >= 1


def test_storage_default_follows_systemd_then_xdg() -> None:
    systemd = {"STATE_DIRECTORY": "/var/lib/asgilook:/var/lib/other", "XDG_DATA_HOME": "/x"}
    assert Config.from_sources([], systemd).storage_path == Path("/var/lib/asgilook")
    assert Config.from_sources([], {"XDG_DATA_HOME": "/x"}).storage_path == Path(
        "/x/asgilook-aiohttp"
    )


def test_environment_sets_every_setting() -> None:
    env = {
        "ASGILOOK_HOST": "::1",
        "ASGILOOK_PORT": "9000",
        "ASGILOOK_STORAGE_PATH": "/srv/images",
        "ASGILOOK_WORKERS": "3",
        "ASGILOOK_HTTP_PROCESSES": "5",
        "ASGILOOK_QUEUE_SIZE": "0",
        "ASGILOOK_CONVERSION_TIMEOUT": "2.5",
        "ASGILOOK_WORKER_MEMORY_MB": "512",
        "ASGILOOK_MAX_UPLOAD_BYTES": "1000",
        "ASGILOOK_MAX_PIXELS": "2000",
        "ASGILOOK_MIN_THUMBNAIL_SIDE": "32",
        "ASGILOOK_JPEG_QUALITY": "80",
        "ASGILOOK_SHUTDOWN_TIMEOUT": "5",
        "ASGILOOK_UPLOAD_MEMORY_MB": "16",
        "ASGILOOK_THUMBNAIL_BUDGET_MB": "64",
        "ASGILOOK_UNIX_PATH": "/run/asgilook.sock",
        "ASGILOOK_LOG_FORMAT": "json",
        "ASGILOOK_LOG_LEVEL": "WARNING",
        "ASGILOOK_TRUSTED_PROXIES": "10.1.2.3/8, unix",
        "ASGILOOK_CORS_ORIGINS": "https://Example.org:443 http://localhost:3000",
    }
    assert Config.from_sources([], env) == _EVERY_SETTING_CHANGED


def test_flags_set_every_setting() -> None:
    flags = [
        *("--host", "::1", "--port", "9000", "--storage", "/srv/images", "--workers", "3"),
        *("--queue-size", "0", "--conversion-timeout", "2.5", "--worker-memory-mb", "512"),
        *("--max-upload-bytes", "1000", "--max-pixels", "2000", "--min-thumbnail-side", "32"),
        *("--jpeg-quality", "80", "--shutdown-timeout", "5", "--upload-memory-mb", "16"),
        *("--thumbnail-budget-mb", "64", "--unix", "/run/asgilook.sock", "--log-format", "json"),
        *("--http-processes", "5", "--log-level", "warning", "--trusted-proxy", "10.1.2.3/8"),
        *("--trusted-proxy", "unix", "--cors-origin", "https://example.org"),
        "http://localhost:3000",
    ]
    assert Config.from_sources(flags, {}) == _EVERY_SETTING_CHANGED


def test_a_configuration_file_sets_every_setting(tmp_path: Path) -> None:
    path = tmp_path / "asgilook.toml"
    path.write_text(
        """
        host = "::1"
        port = 9000
        storage = "/srv/images"
        workers = 3
        http-processes = 5
        queue-size = 0
        conversion-timeout = 2.5
        worker-memory-mb = 512
        max-upload-bytes = 1000
        max-pixels = 2000
        min-thumbnail-side = 32
        jpeg-quality = 80
        shutdown-timeout = 5
        upload-memory-mb = 16
        thumbnail-budget-mb = 64
        unix = "/run/asgilook.sock"
        log-format = "json"
        log-level = "warning"
        trusted-proxy = ["10.1.2.3/8", "unix"]
        cors-origin = ["https://example.org", "http://localhost:3000"]
        """
    )
    assert Config.from_sources(["--config", str(path)], {}) == _EVERY_SETTING_CHANGED
    assert Config.from_sources([], {"ASGILOOK_CONFIG": str(path)}) == _EVERY_SETTING_CHANGED


def test_flags_beat_the_environment_which_beats_the_file_which_beats_defaults(
    tmp_path: Path,
) -> None:
    path = tmp_path / "asgilook.toml"
    path.write_text('port = 9001\nworkers = 7\nqueue-size = 9\ncors-origin = "https://a.example"\n')
    env = {"ASGILOOK_PORT": "9002", "ASGILOOK_WORKERS": "6"}
    config = Config.from_sources(["--config", str(path), "--port", "9003"], env)
    assert (config.port, config.workers, config.queue_size) == (9003, 6, 9)
    assert config.cors_origins == ("https://a.example",)
    assert config.jpeg_quality == 90


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prot = 9000\n", "unknown setting 'prot'"),
        ("write-token = 'x'\n", "unknown setting 'write-token'"),
        ("port = 70000\n", "port = 70000: must be from 0 to 65535"),
        ("port = [1, 2]\n", "port = [1, 2]: must be a string or a number"),
        ("cors-origin = ['https://a.example/path']\n", "must be '*' or an origin"),
        ("port = \n", "is not TOML"),
    ],
)
def test_a_bad_configuration_file_is_refused_naming_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    path = tmp_path / "asgilook.toml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        Config.from_sources(["--config", str(path)], {})
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert str(path) in error
    assert message in error


def test_a_missing_configuration_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        Config.from_sources([], {"ASGILOOK_CONFIG": str(tmp_path / "missing.toml")})
    assert exit_info.value.code == 2
    assert "No such file or directory" in capsys.readouterr().err


_EVERY_SETTING_CHANGED = Config(
    host="::1",
    port=9000,
    storage_path=Path("/srv/images"),
    workers=3,
    http_processes=5,
    queue_size=0,
    conversion_timeout=2.5,
    worker_memory_mb=512,
    max_upload_bytes=1000,
    max_pixels=2000,
    min_thumbnail_side=32,
    jpeg_quality=80,
    shutdown_timeout=5.0,
    upload_memory_mb=16,
    thumbnail_budget_mb=64,
    unix_path=Path("/run/asgilook.sock"),
    log_format="json",
    log_level="warning",
    trusted_proxies=("10.0.0.0/8", "unix"),
    cors_origins=("https://example.org", "http://localhost:3000"),
)


def test_every_setting_has_a_flag_and_a_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        Config.from_sources(["--help"], {})
    named = set(re.findall(r"ASGILOOK_[A-Z0-9_]+", capsys.readouterr().out))
    for field in dataclasses.fields(Config):
        if field.name == "http_process":
            continue  # which HTTP process a share of the settings is for: not a setting
        assert f"ASGILOOK_{field.name.upper()}" in named


def test_flags_beat_environment() -> None:
    env = {"ASGILOOK_PORT": "9000", "ASGILOOK_STORAGE_PATH": "/from/env", "ASGILOOK_WORKERS": "3"}
    config = Config.from_sources(["--port", "9001", "--storage", "/from/flag"], env)
    assert (config.port, config.storage_path, config.workers) == (9001, Path("/from/flag"), 3)


def test_tutorial_storage_variable_is_honoured_after_ours() -> None:
    env = {"ASGI_LOOK_STORAGE_PATH": "/tutorial"}
    assert Config.from_sources([], env).storage_path == Path("/tutorial")
    env["ASGILOOK_STORAGE_PATH"] = "/ours"
    assert Config.from_sources([], env).storage_path == Path("/ours")


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--port", "70000"], {}, "--port: must be from 0 to 65535, not 70000"),
        (["--workers", "0"], {}, "--workers: must be at least 1"),
        ([], {"ASGILOOK_WORKERS": "many"}, "ASGILOOK_WORKERS='many'"),
        ([], {"ASGILOOK_CONVERSION_TIMEOUT": "0"}, "must be a number of seconds above 0"),
        ([], {"ASGILOOK_STORAGE_PATH": ""}, "must not be empty"),
        (["--log-level", "loud"], {}, "must be one of debug, info, warning, error, critical"),
        (["--trusted-proxy", "proxy.example"], {}, "must be an IP address, a network"),
        (["--cors-origin", "example.org"], {}, "must be '*' or an origin"),
        (["--cors-origin", "https://x.example:99999"], {}, "must be '*' or an origin"),
    ],
)
def test_bad_values_are_refused_with_a_message(
    capsys: pytest.CaptureFixture[str], argv: list[str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        Config.from_sources(argv, env)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_write_token_from_the_environment_or_a_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    assert Config.from_sources([], {}).write_token is None
    assert Config.from_sources([], {"ASGILOOK_WRITE_TOKEN": "s3cret"}).write_token == "s3cret"
    env = {"ASGILOOK_WRITE_TOKEN_FILE": str(token_file)}
    assert Config.from_sources([], env).write_token == "from-a-file"
    flag = ["--write-token-file", str(token_file)]
    config = Config.from_sources(flag, {"ASGILOOK_WRITE_TOKEN": "s3cret"})
    assert config.write_token == "from-a-file"
    assert "from-a-file" not in repr(config)


def test_write_token_problems_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, env in (
        (["--write-token-file", str(tmp_path / "missing")], {}),
        ([], {"ASGILOOK_WRITE_TOKEN": "two words"}),
        ([], {"ASGILOOK_WRITE_TOKEN": "  "}),
    ):
        with pytest.raises(SystemExit):
            Config.from_sources(argv, env)
    assert "cannot be read" in capsys.readouterr().err


SHARED = ["--index", "postgresql://asgilook@127.0.0.1:5432/asgilook", "--blobs", "s3://pics/a"]


def test_shared_storage_secrets_come_from_variables_or_files(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("key-from-a-file\n")
    (tmp_path / "password").write_text("password-from-a-file\n")
    env = {
        "AWS_ACCESS_KEY_ID_FILE": str(tmp_path / "key"),
        "AWS_SECRET_ACCESS_KEY": "secret",
        "PGPASSWORD_FILE": str(tmp_path / "password"),
    }
    config = Config.from_sources(SHARED, env)
    assert (config.s3_access_key, config.s3_secret_key) == ("key-from-a-file", "secret")
    assert config.index_password == "password-from-a-file"
    assert config.shared_storage
    for secret in ("key-from-a-file", "secret", "password-from-a-file"):
        assert secret not in repr(config)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--index", "postgresql://me:hunter2@db/pics", "--blobs", "s3://pics"], "PGPASSWORD"),
        (["--index", "mysql://db/pics", "--blobs", "s3://pics"], "must be 'sqlite' or a URL"),
        ([*SHARED[:2], "--blobs", "s3://p"], "must be 'file' or s3://bucket"),
    ],
)
def test_bad_shared_storage_settings_are_refused(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        Config.from_sources(argv, {})
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error
    assert "hunter2" not in error


@pytest.mark.parametrize(
    "argv", [["--index", SHARED[1]], ["--blobs", "s3://pics"], [*SHARED[:2], "--blobs", "file"]]
)
def test_a_mixed_pair_exits_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        Config.from_sources(argv, {})
    assert exit_info.value.code == 2
    said = capsys.readouterr().err
    assert said.startswith("asgilook-aiohttp: --index ")
    assert said.count("\n") == 1


def test_a_value_overridden_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "asgilook.toml"
    path.write_text(f'write-token-file = "{tmp_path / "only-on-the-server"}"\nport = "many"\n')
    env = {"ASGILOOK_WRITE_TOKEN": "s3cret", "ASGILOOK_WORKERS": "many"}
    config = Config.from_sources(["--config", str(path), "--workers", "2", "--port", "1"], env)
    assert (config.write_token, config.workers, config.port) == ("s3cret", 2, 1)
