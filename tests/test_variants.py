"""The variant registry that the front ends of one server share through their adapter directory: two registries on
one directory stand for two front-end processes (the engine's LoRA removal is the edge, recorded). Real adapters
are written (peft config, safetensors)."""

import asyncio

import pytest

from superweights.server.variants import SCALED_IDS, UnknownVariantError, VariantRegistry, VariantsBusyError, lora_id
from tests.test_format import _report

REPORT = _report((17, 99, 50.0), (17, 120, -4.0))


def registry(root, cap: int = 2) -> VariantRegistry:
    return VariantRegistry(root, REPORT, zero_base=True, max_scaled=cap, base_model="tiny")


class Engine:
    """The engine core as the registry sees it: it unloads adapters by id."""

    def __init__(self):
        self.removed: list[int] = []

    async def remove_lora(self, lora_int_id: int) -> bool:
        self.removed.append(lora_int_id)
        return True


def test_ids_are_derived_from_the_variant_not_from_a_counter(tmp_path):
    first, second = registry(tmp_path), registry(tmp_path)
    assert {n: v.lora.lora_int_id for n, v in first.fixed.items() if v.lora} == \
        {n: v.lora.lora_int_id for n, v in second.fixed.items() if v.lora} == \
        {"base": 1, "no_super_weights": 2, "no_super_weight_0": 3, "no_super_weight_1": 4}
    assert lora_id("scaled_1.5", []) == lora_id("scaled_1.5", []) >= SCALED_IDS
    assert lora_id("scaled_1.5", []) != lora_id("scaled_2", [])


def test_a_scaled_arm_made_by_one_front_end_is_served_by_the_other(tmp_path):
    made_by, other, engine = registry(tmp_path), registry(tmp_path), Engine()

    async def scenario():
        made_by.write_fixed()
        variant = await made_by.scaled(1.5, engine.remove_lora)
        made_by.release(variant)
        return variant, other.resolve("scaled_1.5")

    variant, seen = asyncio.run(scenario())
    assert seen.lora.lora_int_id == variant.lora.lora_int_id and seen.lora.lora_path == variant.lora.lora_path
    assert (tmp_path / "scaled_1.5" / "adapter_model.safetensors").is_file()
    assert other.names == ["base", "no_super_weights", "no_super_weight_0", "no_super_weight_1", "scaled_1.5"]


def test_the_bound_holds_for_the_whole_server_and_a_held_arm_is_never_evicted(tmp_path):
    a, b, engine = registry(tmp_path, cap=2), registry(tmp_path, cap=2), Engine()

    async def scenario():
        held = await a.scaled(1.25, engine.remove_lora)  # front end A keeps using it
        b.release(await b.scaled(1.5, engine.remove_lora))
        b.release(await b.scaled(2.0, engine.remove_lora))  # third arm: evicts the idle 1.5, never A's 1.25
        names = a.names
        held_too = await b.scaled(2.0, engine.remove_lora)  # both slots held now: nothing to evict
        with pytest.raises(VariantsBusyError):
            await a.scaled(3.0, engine.remove_lora)
        b.release(held_too)
        a.release(held)
        return names

    names = asyncio.run(scenario())
    assert [n for n in names if n.startswith("scaled_")] == ["scaled_1.25", "scaled_2"]
    assert engine.removed == [lora_id("scaled_1.5", [])]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("scaled_")) == ["scaled_1.25", "scaled_2"]
    with pytest.raises(UnknownVariantError, match="unknown variant 'scaled_1.5'"):
        b.resolve("scaled_1.5")


def test_a_variant_name_is_looked_up_only_as_the_server_spells_it(tmp_path):
    """A client's variant name never chooses a path: after scaled_1.5 exists, "scaled_1.5/" (which pathlib reads as
    the same directory), a name that climbs out of the adapter directory to one holding an adapter_config.json,
    and a non-canonical spelling of 1.5 are all unknown variants (INVALID_ARGUMENT), not a lookup on disk."""
    reg, engine = registry(tmp_path / "adapters"), Engine()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter_config.json").write_text("{}")

    async def scenario():
        reg.write_fixed()
        reg.release(await reg.scaled(1.5, engine.remove_lora))

    asyncio.run(scenario())
    assert reg.resolve("scaled_1.5").name == "scaled_1.5"
    for name in ("scaled_1.5/", "scaled_1.5/../../outside", "scaled_1.50", "scaled_nan", "scaled_"):
        with pytest.raises(UnknownVariantError):
            reg.resolve(name)
