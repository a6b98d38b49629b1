"""A stamp that is JSON but not an object (a damaged or foreign file) means "never built"."""

import pytest
from rackboot import graph


@pytest.mark.parametrize("text", ["[]", '"a"', "7"])
def test_a_stamp_that_is_not_a_json_object_rebuilds_the_artefact(tmp_path, text):
    calls = []

    def build(tmp):
        calls.append("a")
        tmp.write_bytes(b"A")

    art = graph.Artefact(name="a", kind="test", filename="a.bin", inputs={"v": 1}, build=build)
    graph.run([art], tmp_path, log=lambda _: None)
    (tmp_path / graph.STATE_DIR / "a.json").write_text(text)
    result = graph.run([art], tmp_path, log=lambda _: None)
    assert calls == ["a", "a"]
    assert result.outcomes[0].reason == "never built"
