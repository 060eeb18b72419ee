"""The mutation check's list follows the code: every mutation's text is in
the script exactly once and changes it, its test files exist, and the
selection by changed functions picks the mutation of a changed line."""
from __future__ import annotations

import mutants


def test_every_mutation_is_found_once_and_names_existing_tests():
    text = mutants.script_text()
    assert len(mutants.MUTATIONS) >= 40
    for m in mutants.MUTATIONS:
        assert mutants.locate(m, text) is not None, m.name
        assert m.text != m.becomes, m.name
        compile(text.replace(m.text, m.becomes), "mutant", "exec")  # still Python
        for f in m.tests:
            assert mutants.test_path(f).is_file(), (m.name, f)


def test_selection_by_changed_function():
    text = mutants.script_text()
    m = next(m for m in mutants.MUTATIONS if m.name == "bind-time-hard-link")
    line = mutants.locate(m, text)
    start, end, name = next(f for f in mutants.functions(text) if f[0] <= line <= f[1])
    assert name == "Bind" and start < line <= end
