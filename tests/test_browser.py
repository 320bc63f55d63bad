"""Open every kind of report in a real headless Chromium, from file://, with the network off.

A test fails on any page error, console error or attempted non-file:// request, and checks that
every figure drew its SVG and that the sites table has one row per site. Screenshots are saved in
each test's tmp dir. Skipped (with the reason) without /usr/bin/chromium or Playwright's Python
package; Playwright's own browser downloads are never used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from deadscan.cli import main

from test_report import SCRIPT_NAME, figure_specs, parse, run_inspect, run_named, run_strip

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} not found (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-default-apps", "--disable-sync",
        "--disable-extensions", "--metrics-recording-only", "--no-default-browser-check"]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An inspect run, a strip run with --baseline, their comparison, a post-hoc re-render."""
    tmp = tmp_path_factory.mktemp("runs")
    ins = run_inspect(tmp)
    st = run_strip(tmp)
    res = CliRunner().invoke(main, ["compare", str(ins.files["stats"]), str(st.files["stats"]),
                                    "--out", str(tmp / "cmp")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["report", str(st.files["stats"]), "--out", str(tmp / "re")])
    assert res.exit_code == 0, res.output
    return {"inspect": (ins.files["report"], ins.summary), "strip": (st.files["report"], st.summary),
            "compare": (tmp / "cmp" / "compare.html", None), "rerender": (tmp / "re" / "report.html", st.summary)}


def open_report(browser, path: Path, shot: Path):
    """Load ``path`` offline; return (page, context). Fails on errors or network requests."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, offline=True, java_script_enabled=True)
    page = context.new_page()
    errors, requests = [], []
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))

    def route(r):
        if r.request.url.startswith("file://"):
            r.continue_()
        else:
            requests.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.on("request", lambda r: None if r.url.startswith(("file://", "data:", "blob:", "about:")) else requests.append(r.url))
    page.goto(path.resolve().as_uri(), wait_until="load")
    try:
        page.wait_for_function("Array.from(document.querySelectorAll('div.ds-plot'))"
                               ".every(d => d.querySelector('svg.main-svg'))", timeout=20_000)
    except sync_api.TimeoutError:
        pass  # check_figures says which figure did not draw
    page.wait_for_timeout(300)
    page.screenshot(path=str(shot), full_page=True)
    assert not errors, errors
    assert not requests, f"network requests attempted: {requests}"
    return page, context


def check_figures(page, path: Path) -> None:
    """Every plotly div drew SVG with something in it (bars or lines)."""
    ids = parse(path).figures
    assert ids, "no figures"
    drawn = page.evaluate("""Array.from(document.querySelectorAll('div.ds-plot')).map(d => ({
        spec: d.getAttribute('data-spec'),
        svg: d.querySelectorAll('svg.main-svg').length,
        marks: d.querySelectorAll('g.trace path, g.trace .point, g.points path, g.hm image').length,
        width: d.getBoundingClientRect().width}))""")
    assert [d["spec"] for d in drawn] == ids
    for d in drawn:
        assert d["svg"] >= 1, d
        assert d["marks"] >= 1, d
        assert d["width"] > 200, d


def check_table(page, summary: dict | None, n: int | None = None) -> None:
    rows = page.evaluate("Array.from(document.querySelectorAll('#sites-table tbody tr')).map(r => r.getAttribute('data-site'))")
    if summary is not None:
        assert rows == [s["name"] for s in summary["sites"]]
    else:
        assert len(rows) == n


@pytest.mark.parametrize("kind", ["inspect", "strip", "rerender"])
def test_report_renders_offline(browser, runs, kind, tmp_path):
    path, summary = runs[kind]
    page, ctx = open_report(browser, path, tmp_path / f"{kind}.png")
    try:
        check_figures(page, path)
        check_table(page, summary)
        cards = page.evaluate("Object.fromEntries(Array.from(document.querySelectorAll('[data-key]')).map(e => [e.dataset.key, e.textContent]))")
        assert int(cards["dead"].replace(",", "")) == summary["totals"]["dead"]
        assert page.title().startswith("deadscan report: ")
    finally:
        ctx.close()
    assert (tmp_path / f"{kind}.png").stat().st_size > 10_000


def test_table_sorts_on_click(browser, runs, tmp_path):
    path, summary = runs["inspect"]
    page, ctx = open_report(browser, path, tmp_path / "sort.png")
    try:
        order = "Array.from(document.querySelectorAll('#sites-table tbody tr')).map(r => r.getAttribute('data-site'))"
        page.click("#sites-table thead th:nth-child(7)")  # dead: most dead first
        first = page.evaluate(order)
        assert first == [s["name"] for s in sorted(summary["sites"], key=lambda s: -s["dead"])]
        assert page.get_attribute("#sites-table thead th:nth-child(7)", "aria-sort") == "descending"
        page.click("#sites-table thead th:nth-child(7)")
        again = page.evaluate(order)
        assert again == [s["name"] for s in sorted(summary["sites"], key=lambda s: s["dead"])]
        page.click("#sites-table thead th:nth-child(8)")  # dead %: also largest first
        pct = page.evaluate(order)
        assert pct == [s["name"] for s in sorted(summary["sites"], key=lambda s: -s["dead"] / s["neurons"])]
        page.click("#sites-table thead th:nth-child(2)")  # text: A to Z first
        assert page.evaluate(order) == sorted(s["name"] for s in summary["sites"])
    finally:
        ctx.close()


def test_compare_renders_offline(browser, runs, tmp_path):
    path, _ = runs["compare"]
    page, ctx = open_report(browser, path, tmp_path / "compare.png")
    try:
        check_figures(page, path)
        check_table(page, None, n=len(runs["inspect"][1]["sites"]))
    finally:
        ctx.close()


def test_dropdown_switches_site(browser, runs, tmp_path):
    """The per-site dropdown of the weight histogram shows one site's traces."""
    path, summary = runs["inspect"]
    page, ctx = open_report(browser, path, tmp_path / "menu.png")
    try:
        visible = page.evaluate("""(() => { const d = document.querySelector('#fig-weights .ds-plot');
            return new Promise(done => { Plotly.restyle(d, {visible: d.layout.updatemenus[0].buttons[1].args[0].visible})
              .then(() => done(d.data.map(t => t.visible))); }); })()""")
        assert visible.count(True) == 2
    finally:
        ctx.close()


def test_html_names_stay_text_in_the_browser(browser, tmp_path):
    got = run_named(tmp_path / "named")
    page, ctx = open_report(browser, got["report"], tmp_path / "named.png")
    try:
        assert page.evaluate("window.__deadscan_pwned") is None
        cells = page.evaluate("Array.from(document.querySelectorAll('#sites-table td[data-col=name]')).map(c => c.textContent)")
        assert cells == [s["name"] for s in got["summary"]["sites"]]
        assert any(SCRIPT_NAME in c for c in cells)
        assert page.evaluate("document.querySelectorAll('main b').length") == page.evaluate(
            "document.querySelectorAll('main .ds-card b, main .ds-meta b').length")  # no injected <b>
        ticks = page.evaluate("Array.from(document.querySelectorAll('#fig-dead-per-site .xtick text')).map(t => t.textContent)")
        assert any("</script>" in t for t in ticks), ticks  # drawn as text by plotly
        check_figures(page, got["report"])
        specs = figure_specs(parse(got["report"]))
        assert json.dumps(specs).count("__deadscan_pwned") >= 1
    finally:
        ctx.close()


def test_language_model_sized_report_renders(browser, tmp_path):
    """96 sites x 30,000 neurons (synthetic, see test_report_scale.py): every figure draws, the
    per-site frequencies as one heatmap, and the sites table has a row per site."""
    from deadscan.report import write_report
    from test_report_scale import synthetic_report

    data = synthetic_report()
    path = write_report(data, tmp_path / "big")
    page, ctx = open_report(browser, path, tmp_path / "big.png")
    try:
        drawn = page.evaluate("""Array.from(document.querySelectorAll('div.ds-plot')).map(d => [
            d.getAttribute('data-spec'), d.querySelectorAll('svg.main-svg').length,
            d.querySelectorAll('g.trace path, g.trace .point, g.points path, g.hm image').length])""")
        assert [d[0] for d in drawn] == parse(path).figures
        assert "spec-frequency-by-site" in [d[0] for d in drawn]
        assert all(d[1] >= 1 and d[2] >= 1 for d in drawn), drawn
        check_table(page, data.summary)
    finally:
        ctx.close()


def test_dead_percent_bars_have_width(browser, runs, tmp_path):
    """Each dead-% bar spans the site's dead share of the cell (minus 6 px padding each side)."""
    path, summary = runs["inspect"]
    page, ctx = open_report(browser, path, tmp_path / "bars.png")
    try:
        got = page.evaluate("""Array.from(document.querySelectorAll('#sites-table td[data-col=dead_pct]')).map(td => ({
            pct: parseFloat(td.getAttribute('data-v')), cell: td.getBoundingClientRect().width,
            bar: td.querySelector('.ds-bar').getBoundingClientRect().width}))""")
        assert len(got) == len(summary["sites"])
        assert any(g["pct"] > 0 for g in got), "the fixture must have dead neurons"
        for g in got:
            assert g["bar"] == pytest.approx((g["cell"] - 12) * g["pct"] / 100, abs=1.5), g
            if g["pct"] >= 1:
                assert g["bar"] > 0, g
    finally:
        ctx.close()


def test_warning_banner_is_visible(browser, tmp_path):
    from deadscan.errors import DeadscanWarning
    from test_report import _hand_mlp
    import torch

    m = _hand_mlp()
    with torch.no_grad():
        m.fc2.weight[5, 1] = float("nan")
    with pytest.warns(DeadscanWarning):
        run = run_inspect(tmp_path, model=m)
    page, ctx = open_report(browser, run.files["report"], tmp_path / "nan.png")
    try:
        assert page.is_visible("#warnings")
        assert "NaN or Inf weights in 1 layer(s): fc2" in page.inner_text("#warnings")
        box = page.evaluate("(() => { const r = document.querySelector('#warnings').getBoundingClientRect(); "
                            "return [r.top, r.height]; })()")
        assert box[0] < 900 and box[1] > 20, box  # above the fold, not collapsed
        assert page.locator("#sites-table tr.ds-nonfinite").count() >= 1
    finally:
        ctx.close()


def test_modebar_does_not_cover_the_dropdown(browser, runs, tmp_path):
    path, _ = runs["inspect"]
    page, ctx = open_report(browser, path, tmp_path / "modebar.png")
    try:
        page.hover("#fig-weights .ds-plot")
        page.wait_for_timeout(300)
        boxes = page.evaluate("""(() => { const d = document.querySelector('#fig-weights .ds-plot');
            const r = s => { const e = d.querySelector(s); if (!e) return null; const b = e.getBoundingClientRect();
                             return [b.left, b.top, b.right, b.bottom]; };
            return {bar: r('.modebar'), menu: r('.updatemenu-container .updatemenu-header-group'),
                    legend: r('g.legend')}; })()""")
        assert boxes["menu"] is not None, boxes
        a, b = boxes["legend"], boxes["menu"]
        assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), boxes  # nor the legend
        if boxes["bar"] is not None:
            a, b = boxes["bar"], boxes["menu"]
            overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
            assert not overlap, boxes
    finally:
        ctx.close()
