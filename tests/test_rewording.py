"""Reworded prompts: copies of a request's prompt with words around the subject left out."""

from __future__ import annotations

import dataclasses

import pytest
from test_methods import assert_edit_refuses, assert_recorded_and_kept, tiny_edit_command

from alphaedit.config import EditConfig
from alphaedit.requests import EditRequest
from alphaedit.rewording import reworded_prompts

PROMPTS = ["Who is the architect of {}?", "The genus {} is a part of what family?", "{} is located in the city of",
           "What is the name of {}'s father?", "In which fictional universe is {} a character?"]


def _words(text: str) -> list[str]:
    return text.split()


def _is_subsequence(part: list[str], whole: list[str]) -> bool:
    it = iter(whole)
    return all(word in it for word in part)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_each_copy_keeps_the_subject_and_leaves_out_whole_words_on_its_side(prompt):
    request = EditRequest(prompt, "Toodyay Fire Station", "Ken Duncan")
    copies = reworded_prompts(request, 3, 0.4)
    assert copies and len(copies) == len(set(copies)) <= 3
    before, after = prompt.split("{}")
    for copy in copies:
        assert copy != prompt and copy.count("{}") == 1
        copy_before, copy_after = copy.split("{}")
        # words stay on their side of the subject and in their order; none is invented or cut in half
        assert _is_subsequence(_words(copy_before), _words(before))
        assert _is_subsequence(_words(copy_after), _words(after))
        # the space between the words and the subject is kept where a word before it is
        assert not copy_before or copy_before.endswith(" ") == before.endswith(" ")
        assert not copy_before.startswith(" ")


def test_the_same_request_always_gets_the_same_copies_and_fewer_copies_are_a_prefix():
    request = EditRequest(PROMPTS[1], "Platypatrobus", "Carabidae")
    assert reworded_prompts(request, 3, 0.3) == reworded_prompts(dataclasses.replace(request), 3, 0.3)
    assert reworded_prompts(request, 3, 0.3)[:1] == reworded_prompts(request, 1, 0.3)
    other = dataclasses.replace(request, subject="Ramalinaceae")  # another request draws its own copies
    assert reworded_prompts(request, 3, 0.3) != reworded_prompts(other, 3, 0.3)


def test_none_when_not_asked_for_for_a_chat_turn_or_when_no_word_may_drop():
    request = EditRequest(PROMPTS[0], "Toodyay Fire Station", "Ken Duncan")
    assert reworded_prompts(request, 0, 0.3) == []
    assert reworded_prompts(dataclasses.replace(request, chat_turn=True), 2, 0.3) == []
    assert reworded_prompts(request, 2, 0.0) == []  # every copy would be the prompt itself
    assert reworded_prompts(EditRequest("{}", "Toodyay Fire Station", "Ken Duncan"), 2, 0.5) == []  # no words to leave out


def test_the_config_refuses_a_negative_count_or_a_drop_outside_0_1():
    with pytest.raises(ValueError, match="reworded_prompts"):
        EditConfig(reworded_prompts=-1)
    for drop in (-0.1, 1.0):
        with pytest.raises(ValueError, match="reword_drop"):
            EditConfig(reword_drop=drop)


def test_reworded_prompts_from_the_command_line(tiny_model_folder, tmp_path):
    common, env = tiny_edit_command(tiny_model_folder, tmp_path)
    assert_edit_refuses(common, env, tmp_path, ((["--reworded-prompts", "-1"], "--reworded-prompts"),))
    # recorded in the journal, and a continuation with another count is refused
    assert_recorded_and_kept(common, env, tmp_path / "state", "--reworded-prompts", "2", "1", "reworded_prompts", 2)
