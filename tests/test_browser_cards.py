"""The cards as a clinician sees them: rendered as the CDS Hooks sandbox renders them, checked in headless Chromium.

The sandbox (cds-hooks/sandbox 3b7e255, card-list.jsx; its bundle in ../shared/cds-hooks-sandbox) renders
Card.detail with react-markdown, remark-gfm and rehype-raw: GitHub-flavoured markdown with raw HTML allowed. The same
libraries at the sandbox's versions (tests/browser/package.json, installed by `npm ci` from the lock file) render each
card's detail; Debian's Chromium loads the result and reports, per card, every element, link and word. No text the
client sent may become a link, an image or any HTML element, and the detail stays within 120 words.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from cds_service import create_app
from cds_service.engine import load_policies
from cds_service.runtime import services_of

from . import builders as b
from .chromium_support import HEADLESS
from .conftest import ROOT, SIGN
from .test_crd_test_kit import SERVICES

pytestmark = pytest.mark.slow

BROWSER_DIR = ROOT / "tests" / "browser"
FIXTURES = ROOT / "fixtures" / "hooks"
MAX_WORDS = 120
WORD_JOINER = "\u2060"
# The elements the card's own markdown makes: paragraphs, bold, italics, the why-list, the policy links.
ALLOWED = {"P", "STRONG", "EM", "UL", "LI", "A"}
HOSTILE = (
    "DMX cervical spine [click here](https://evil.example) <img src=x onerror=alert(1)> <script>alert(1)</script>"
    " www.evil.example https://evil.example/x a@evil.example ![i](https://evil.example/i.png) **bold** <b>b</b>"
    " &lt;i&gt; | a | b | ~~strike~~ [^1] <!-- c --> `code`"
)
CHROMIUM_FLAGS = [*HEADLESS, "--virtual-time-budget=5000"]
# Runs in the page: for each card, its elements, links, attributes and words, written where --dump-dom shows it.
PAGE_SCRIPT = """
const out = [];
for (const section of document.querySelectorAll("section")) {
  const elements = [...section.querySelectorAll("*")];
  out.push({
    tags: [...new Set(elements.map((e) => e.tagName))],
    links: [...section.querySelectorAll("a")].map((a) => ({href: a.getAttribute("href"), text: a.textContent})),
    attributes: elements.flatMap((e) => [...e.attributes].map((a) => e.tagName + " " + a.name)),
    text: section.innerText,
    words: section.innerText.split(/\\s+/).filter((w) => /\\w/.test(w)).length,
  });
}
const pre = document.createElement("pre");
pre.id = "result";
pre.textContent = JSON.stringify(out);
document.body.appendChild(pre);
"""


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Chromium is missing: .ci/run installs Debian's chromium (apt-get install -y chromium)"
    return path


def render_as_the_sandbox(details: list[str]) -> list[str]:
    """HTML from react-markdown + remark-gfm + rehype-raw, installed from tests/browser/package-lock.json."""
    if not (BROWSER_DIR / "node_modules" / "react-markdown").is_dir():
        # The npm registry is reachable where this runs (.ci/run does the same before the tests).
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=BROWSER_DIR, check=True, timeout=300)
    result = subprocess.run(
        ["node", "render.mjs"],
        cwd=BROWSER_DIR,
        input=json.dumps(details),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    html: list[str] = json.loads(result.stdout)
    return html


def in_chromium(fragments: list[str], tmp_path: Path) -> list[dict[str, Any]]:
    sections = "\n".join(f"<section>{fragment}</section>" for fragment in fragments)
    page = tmp_path / "cards.html"
    page.write_text(
        f'<!doctype html><html><head><meta charset="utf-8"></head><body>{sections}'
        f"<script>{PAGE_SCRIPT}</script></body></html>",
        encoding="utf-8",
    )
    profile = tmp_path / "profile"
    result = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    start = result.stdout.index('<pre id="result">') + len('<pre id="result">')
    dumped = result.stdout[start : result.stdout.index("</pre>", start)]
    import html

    reports: list[dict[str, Any]] = json.loads(html.unescape(dumped))
    assert len(reports) == len(fragments)
    return reports


def cards(app: Flask) -> list[tuple[str, dict[str, Any]]]:
    """Every card of the fixtures, and of orders whose words try every markdown and HTML construct."""
    client = app.test_client()
    out = []
    for path in sorted(FIXTURES.glob("*.request.json")):
        body = json.loads(path.read_text())
        body.pop("fhirServer", None)
        body.pop("fhirAuthorization", None)
        response = client.post(f"/cds-services/{SERVICES[body['hook']]}", json=body)
        assert response.status_code == 200
        out += [(path.name, card) for card in response.get_json()["cards"]]
    hostile = [
        b.service_request("h1", text=HOSTILE),
        b.service_request("h2", text="Videofluoroscopy", note=[{"text": HOSTILE}], reasonCode=[{"text": HOSTILE}]),
        b.service_request("h3", text=" ".join(["Digital motion x-ray"] + ["very"] * 300 + ["long name"])),
        b.service_request("h4", text="Cineradiography thoracic spine <a href='https://evil.example'>see</a>"),
    ]
    config = {"davinci-crd.configuration": {"instructions": True}}
    response = client.post(f"/cds-services/{SIGN}", json=b.hook_request("order-sign", hostile, extension=config))
    assert response.status_code == 200
    out += [("hostile", card) for card in response.get_json()["cards"]]
    return out


@pytest.fixture(scope="module")
def shown(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    folder = tmp_path_factory.mktemp("browser")
    app = create_app({"AUTH": "off", "DATABASE_URL": f"sqlite:///{folder / 'b.db'}"})
    try:
        all_cards = cards(app)
    finally:
        services_of(app).store.close()
    reports = in_chromium(render_as_the_sandbox([card["detail"] for _, card in all_cards]), folder)
    return [(name, card, report) for (name, card), report in zip(all_cards, reports, strict=True)]


def test_the_cards_render_in_chromium(shown: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> None:
    assert len(shown) >= 12
    assert {name for name, _, _ in shown} >= {"hostile", "order-sign-r4-crd22-instructions.request.json"}
    for name, card, report in shown:
        assert report["text"].strip() and report["words"] > 10, (name, card["detail"])


def test_no_client_text_becomes_a_link_an_image_or_an_element(
    shown: list[tuple[str, dict[str, Any], dict[str, Any]]],
) -> None:
    policy_links = {link.url: link.detail for p in load_policies().policies for link in p.card.links}
    for name, card, report in shown:
        assert set(report["tags"]) <= ALLOWED, (name, report["tags"], card["detail"])
        # The only attribute anywhere is the href of the policy's own links, labelled as the policy says.
        assert all(attribute == "A href" for attribute in report["attributes"]), (name, report["attributes"])
        for link in report["links"]:
            assert link["href"] in policy_links and link["text"] == policy_links[link["href"]], (name, link)


def test_hostile_words_show_as_the_text_the_client_wrote(
    shown: list[tuple[str, dict[str, Any], dict[str, Any]]],
) -> None:
    texts = [report["text"].replace(WORD_JOINER, "") for name, _, report in shown if name == "hostile"]
    # The order's name, cut to its first words, reads exactly as typed: brackets, tags and addresses as text.
    assert any("DMX cervical spine [click here](https://evil.example) <img src=x" in text for text in texts)
    assert not any("alert(1)</script>" in text and "<script>" not in text for text in texts)
    assert any("<a href='https://evil.example'>see</a>" in text for text in texts)


def test_every_detail_reads_within_120_words(shown: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> None:
    words = {name: [] for name, _, _ in shown}  # type: dict[str, list[int]]
    for name, _, report in shown:
        words[name].append(report["words"])
        assert report["words"] <= MAX_WORDS, (name, report["words"], report["text"])
    print({name: counts for name, counts in words.items()})  # noqa: T201 - the measured numbers, with -s


def test_no_internal_identifiers_in_what_the_clinician_reads(
    shown: list[tuple[str, dict[str, Any], dict[str, Any]]],
) -> None:
    for name, card, report in shown:
        for reference in card.get("extension", {}).get("davinci-crd.associated-resource", []):
            assert reference["reference"] not in report["text"], name
        assert "ServiceRequest/" not in report["text"] and "ServiceRequest/" not in card["summary"], name
