"""Consistency with ROME's statistics: fetched once (from a local stand-in for their host), checked,
and scored as sklearn's TfidfVectorizer fitted with their idf and vocabulary."""

from __future__ import annotations

import functools
import http.server
import json
import threading

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

from alphaedit.eval.consistency import ROME_FILES, load_rome

VOCAB = {"paris": 0, "city": 1, "rome": 2, "river": 3, "the": 4}
IDF = np.array([1.5, 1.2, 2.0, 1.7, 1.0])
SNIPPETS = [
    {"relation_id": "P131", "target_id": "Q220", "samples": [{"name": "Colosseum", "text": "The Colosseum is in Rome, a city."},
                                                            {"name": "Trevi", "text": "Rome's river runs by."}]},
    {"relation_id": "P17", "target_id": "Q142", "samples": [{"name": "Lyon", "text": "Lyon is a city of France."}]},
]


def _write_rome_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "idf.npy", IDF)
    (folder / "tfidf_vocab.json").write_text(json.dumps(VOCAB))
    (folder / "attribute_snippets.json").write_text(json.dumps(SNIPPETS))


@pytest.fixture
def rome_host(tmp_path, monkeypatch):
    """ROME's three files served over HTTP on localhost, with a request log."""
    served = tmp_path / "served"
    _write_rome_files(served)
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("ALPHAEDIT_ROME_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("ALPHAEDIT_HOME", str(tmp_path / "home"))
    yield requests
    server.shutdown()


def test_rome_statistics_are_fetched_once_and_score_as_sklearn(rome_host, tmp_path):
    rome = load_rome("rome")
    assert sorted(p.strip("/") for p in rome_host if p.strip("/") in ROME_FILES) == sorted(ROME_FILES)
    fetched = len(rome_host)
    load_rome("rome")
    assert len(rome_host) == fetched  # cached: never fetched again
    assert rome.texts("P131", "Q220") == ["The Colosseum is in Rome, a city.", "Rome's river runs by."]
    assert rome.texts("P131", "Q999") == []

    vectorizer = TfidfVectorizer(vocabulary=VOCAB)  # ROME sets vocabulary_ and idf_ on a fitted one; the same vectoriser
    vectorizer.fit(["paris"])
    vectorizer.idf_ = IDF
    generated, references = "The river of Paris, the city of lights", " ".join(rome.texts("P131", "Q220"))
    a, b = vectorizer.transform([generated, references]).toarray()
    assert rome.tfidf.cosine(generated, references) == pytest.approx(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))


def test_a_folder_of_rome_files_is_checked(tmp_path):
    folder = tmp_path / "rome"
    _write_rome_files(folder)
    assert load_rome(f"rome:{folder}").texts("P17", "Q142") == ["Lyon is a city of France."]
    (folder / "idf.npy").unlink()
    with pytest.raises(ValueError, match="lacks idf.npy"):
        load_rome(f"rome:{folder}")


def test_a_failed_or_foreign_download_keeps_nothing(rome_host, tmp_path, monkeypatch):
    served = tmp_path / "served"
    (served / "tfidf_vocab.json").write_text("<html>not found</html>")
    with pytest.raises(ValueError, match="not ROME's tfidf_vocab.json"):
        load_rome("rome")
    assert not (tmp_path / "home" / "data" / "rome" / "tfidf_vocab.json").exists()
    monkeypatch.setenv("ALPHAEDIT_ROME_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ValueError, match="offline, use --consistency local"):
        load_rome("rome")
