import pytest

from recbole_llmgen import text


def test_default_fields_pick_title_and_year():
    assert text.default_text_fields(["item_id", "movie_title", "release_year", "class"], "item_id") == [
        "movie_title",
        "release_year",
    ]
    assert text.default_text_fields(["item_id", "name", "price"], "item_id") == ["name"]


def test_default_fields_without_title_names_the_fields():
    with pytest.raises(ValueError, match=r"item_text_fields.*\['price', 'brand'\]"):
        text.default_text_fields(["item_id", "price", "brand"], "item_id")


def test_template_and_render():
    template = text.default_template(["movie_title", "release_year"])
    assert template == "{movie_title} ({release_year})"
    assert text.render_item_text(template, {"movie_title": "Toy Story", "release_year": "1995"}) == "Toy Story (1995)"
    # a missing year leaves no empty parentheses
    assert text.render_item_text(template, {"movie_title": "Toy Story", "release_year": ""}) == "Toy Story"
    assert text.default_template(["title", "brand"]) == "{title}, {brand}"
    assert text.template_fields("{a} and {b}") == ["a", "b"]


def test_empty_texts_get_placeholder_and_warn_once():
    with pytest.warns(UserWarning, match="1 item"):
        out = text.fill_empty_texts(["", "A", ""], ["[PAD]", "x1", "x2"], "fields ['title']")
    assert out == ["", "A", "Item x2"]


def test_all_empty_texts_fail():
    with pytest.raises(ValueError, match="every item has an empty text"):
        text.fill_empty_texts(["", "", ""], ["[PAD]", "a", "b"], "fields ['title']")


def test_history_is_numbered_most_recent_last():
    prompt = text.user_prompt("Seen:\n{history}\nNext?", ["A", "B", "C"])
    assert prompt == "Seen:\n1. A\n2. B\n3. C\nNext?"


def test_verbalizer_prompt_letters_and_limit():
    prompt = text.verbalizer_prompt("{history}", ["A"], ["x", "y"])
    assert "A. x\nB. y" in prompt
    with pytest.raises(ValueError, match="at most 26 candidates"):
        text.verbalizer_prompt("{history}", [], [str(i) for i in range(27)])
