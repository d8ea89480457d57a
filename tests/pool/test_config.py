"""Parsing pool settings (README *Usage*, *Paths in a source*), without mounting."""

from __future__ import annotations

import pytest

from fusestore.pool.config import (
    ConfigError,
    DatadirSpec,
    build_pool_config,
    escape_list_item,
    parse_datadir_spec,
    parse_size,
    split_list,
)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("/srv/fast:200", DatadirSpec("/srv/fast", 200)),
        ("/srv/big", DatadirSpec("/srv/big", 0)),
        ("/srv/a:b:7", DatadirSpec("/srv/a:b", 7)),
        ("/srv/zero:0", DatadirSpec("/srv/zero", 0)),
        ("/srv/trailing/:5", DatadirSpec("/srv/trailing", 5)),
    ],
)
def test_datadir_spec_takes_priority_after_last_colon(spec: str, expected: DatadirSpec) -> None:
    assert parse_datadir_spec(spec) == expected


def test_relative_datadir_is_refused_without_a_base_directory() -> None:
    with pytest.raises(ConfigError, match="'images:3': relative path"):
        parse_datadir_spec("images:3")


def test_relative_datadir_is_taken_from_the_base_directory() -> None:
    assert parse_datadir_spec("images/../store:3", "/etc/fusestore") == DatadirSpec(
        "/etc/fusestore/store", 3
    )


@pytest.mark.parametrize(
    ("text", "items"),
    [
        ("/a:1,/b", ["/a:1", "/b"]),
        ("/srv/c\\,d:5", ["/srv/c,d:5"]),
        ("/x\\\\,/y", ["/x\\", "/y"]),
        (",/a,,", ["/a"]),
    ],
)
def test_lists_split_at_commas_not_escaped_ones(text: str, items: list[str]) -> None:
    assert split_list(text) == items
    assert split_list(",".join(map(escape_list_item, items))) == items


@pytest.mark.parametrize("priority", ["-1", "high", "", "1.5", "²", " 3"])
def test_priority_that_is_not_all_digits_is_rejected_by_value(priority: str) -> None:
    with pytest.raises(ConfigError, match=f"priority {priority!r}"):
        parse_datadir_spec(f"/srv/x:{priority}")


@pytest.mark.parametrize("spec", ["", ":100"])
def test_empty_path_is_rejected(spec: str) -> None:
    with pytest.raises(ConfigError, match="empty path"):
        parse_datadir_spec(spec)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("4096", 4096),
        ("16M", 16 << 20),
        ("16m", 16 << 20),
        ("4G", 4 << 30),
        ("2T", 2 << 40),
        ("512K", 512 << 10),
        ("16MiB", 16 << 20),
    ],
)
def test_sizes_use_binary_suffixes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "-1", "1.5G", "16X", "lots"])
def test_bad_size_is_rejected_by_value(text: str) -> None:
    with pytest.raises(ConfigError, match=f"size {text!r}"):
        parse_size(text)


def test_single_datadir_has_priority_zero() -> None:
    config = build_pool_config("/srv/images", None, "1K")
    assert config.datadirs == (DatadirSpec("/srv/images", 0),)
    assert config.min_free_space == 1024


def test_datadir_list_keeps_given_order() -> None:
    config = build_pool_config(None, ["/a:1", "/b:5", "/c"])
    assert [d.path for d in config.datadirs] == ["/a", "/b", "/c"]
    assert [d.priority for d in config.datadirs] == [1, 5, 0]


def test_both_datadir_forms_is_an_error() -> None:
    with pytest.raises(ConfigError, match="not both"):
        build_pool_config("/a", ["/b:1"])


def test_neither_datadir_form_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no datadir"):
        build_pool_config(None, [])


def test_same_directory_twice_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError, match="'/srv/a' is named twice"):
        build_pool_config(None, ["/srv/a:1", "/srv/b:2", "/srv/./a:3"])


def test_empty_single_datadir_is_an_error() -> None:
    with pytest.raises(ConfigError, match="empty path"):
        build_pool_config("", None)
