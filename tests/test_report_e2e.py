"""Browser check of the report page: headless Chromium loads it with no console errors, every
image decodes, every table has its rows (make test-e2e; needs `apt-get install chromium`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from test_report import fake_results, fake_run

from depthlab.report import build_report

pytestmark = pytest.mark.e2e

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHECK_SCRIPT = """<script>
(function () {
  var errors = [];
  window.addEventListener('error', function (e) {
    errors.push(e.message || ('resource failed: ' + ((e.target && (e.target.src || e.target.href)) || '?')));
  }, true);
  window.addEventListener('load', function () {
    var imgs = Array.prototype.slice.call(document.images);
    var tables = {};
    Array.prototype.slice.call(document.querySelectorAll('table')).forEach(function (t) {
      tables[t.id] = t.tBodies.length ? t.tBodies[0].rows.length : 0;
    });
    var out = document.createElement('pre');
    out.id = 'depthlab-check';
    out.textContent = JSON.stringify({
      images: imgs.map(function (i) { return [i.alt, i.complete, i.naturalWidth, i.naturalHeight]; }),
      tables: tables, errors: errors
    });
    document.body.appendChild(out);
  });
})();
</script>"""


def _browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def test_report_renders_in_headless_chromium(tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("chromium not installed (apt-get update && apt-get install -y chromium)")
    sweep = tmp_path / "sweep"
    fake_run(sweep, "L2", n_layers=2, diagnose=True)
    fake_run(sweep, "L4", n_layers=4, diagnose=True, moe=(4, 2, None))  # + moe_routing
    fake_run(sweep, "L8", n_layers=8, steps=10, complete=False)
    ladder = tmp_path / "ladder.json"
    ladder.write_text(json.dumps([{"name": "baseline", "ppl": 20.1, "usefulness": 0.5},
                                  {"name": "+wd", "ppl": 19.2, "usefulness": 0.7}]))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "results.json").write_text(json.dumps(fake_results(3)))
    rep = build_report([sweep, hf], tmp_path / "out", ladder=ladder)
    expected_tables = {"table-runs": 3, "table-diagnoses": 1, "table-moe": 1,
                       "table-ladder": 2}

    # the check runs on a copy: the report itself carries no script
    page = tmp_path / "check.html"
    page.write_text(rep.html.read_text(encoding="utf-8").replace("</body>", CHECK_SCRIPT +
                                                                  "</body>"), encoding="utf-8")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom",
           page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln]
    assert not console, console
    m = re.search(r'<pre id="depthlab-check">(.*?)</pre>', proc.stdout, re.S)
    assert m, "the page did not finish loading"
    result = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert result["errors"] == []
    assert len(result["images"]) == len(rep.drawn) >= 8
    for alt, complete, width, height in result["images"]:
        assert complete and width > 0 and height > 0, f"image {alt!r} did not decode"
    assert result["tables"] == expected_tables
