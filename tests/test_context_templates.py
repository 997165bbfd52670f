"""The context-template prefixes as an option: which words start them, from the config and the command line."""

from __future__ import annotations

import copy
import json

import pytest
from test_methods import assert_edit_refuses, assert_eval_refuses, tiny_edit_command

from alphaedit.config import EditConfig
from alphaedit.editor import Editor


def test_the_config_refuses_a_blank_word():
    for words in ([""], ["The", "  "]):
        with pytest.raises(ValueError, match="context_template_words"):
            EditConfig(context_template_words=words)
    assert EditConfig(context_template_words=[]).context_template_words == []  # the prompt alone


@pytest.mark.parametrize("words", [[], ["The"], ["Because", "I"]])
def test_one_prefix_per_word_after_the_plain_prompt(llama, tokenizer, words):
    model, _ = llama
    editor = Editor(copy.deepcopy(model), tokenizer, config=EditConfig(layers=[1, 2], context_template_words=words), show_progress=False)
    templates = editor.context_templates()
    assert templates[0] == "{}" and len(templates) == 1 + len(words)
    for word, template in zip(words, templates[1:]):
        assert template.startswith(word) and template.endswith(". {}")


def test_context_templates_from_the_command_line(tiny_model_folder, tmp_path):
    from typer.testing import CliRunner

    from alphaedit.cli import app

    common, env = tiny_edit_command(tiny_model_folder, tmp_path)
    assert_edit_refuses(common, env, tmp_path, ((["--context-templates", "The,,A"], "--context-templates"),))
    assert_eval_refuses(tiny_model_folder, env, tmp_path, ["--context-templates", "The, ,A"], "--context-templates")
    state = tmp_path / "state"
    done = CliRunner().invoke(app, [*common, "--state", str(state), "--context-templates", " Because, I"], env=env)
    assert done.exit_code == 0, done.output
    assert json.loads((state / "header.json").read_text())["config"]["context_template_words"] == ["Because", "I"]
    # a continuation with other words is refused, naming the recorded ones as they are written
    again = CliRunner().invoke(app, [*common, "--state", str(state), "--context-templates", "The"], env=env)
    assert again.exit_code == 2 and "--context-templates 'Because,I'" in again.output, again.output
    # none at all: the plain prompt only
    alone = tmp_path / "alone"
    done = CliRunner().invoke(app, [*common, "--state", str(alone), "--context-templates", ""], env=env)
    assert done.exit_code == 0, done.output
    assert json.loads((alone / "header.json").read_text())["config"]["context_template_words"] == []
