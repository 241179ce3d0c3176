"""`make screenshots`: the README's pictures of the Video tags pages, taken from `make demo`'s data (1,280
videos, the real vocabulary's names), in Airflow's light and dark themes.

    python -m tests.support.screenshots --vtag-home .demo --out docs/screenshots

A local Airflow as `make airflow` starts it (airflow_glue.local_airflow) over the demo's VTAG_HOME, with an
AIRFLOW_HOME of its own and no schedules; headless Chromium logs in through Airflow's form, then opens each
page once per theme. The browser tests (tests/test_ui_browser.py) check what the pages show; this takes the
pictures of a real-size product."""

import argparse
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

from tests.support.airflow_ui import CHROMIUM_ARGS, UI_TIMEOUT_MS, chromium, local_airflow, log_in
from tests.support.worlds import row

THEMES = ("light", "dark")


def _pages(db_url: str) -> dict[str, str]:
    """name -> path of each page worth a picture, for the demo's production model, night and a tagged video."""
    version = row(db_url, "SELECT MAX(version) FROM model_versions WHERE status = 'production'")[0]
    run_id = row(db_url, "SELECT MAX(run_id) FROM inference_runs WHERE status = 'succeeded'")[0]
    if version is None or run_id is None:
        raise SystemExit(f"{db_url}: no production model or no succeeded night: run `make demo` first")
    video, label = row(db_url, "SELECT video_id, label_id FROM predictions WHERE rank = 1 ORDER BY score DESC LIMIT 1")
    word = (row(db_url, f"SELECT name FROM labels WHERE label_id = {int(label)}")[0] or "a")[:3]
    return {
        "models": "/video-tags/models",
        "model": f"/video-tags/models/{version}",
        "nights": "/video-tags/nights",
        "night": f"/video-tags/nights/{run_id}",
        "tags_search": f"/video-tags/tags?q={quote(word)}",
        "tags_video": f"/video-tags/tags/videos/{quote(video)}",
        "tags_label": f"/video-tags/tags/labels/{label}",
    }


def take(vtag_home: Path, out: Path) -> list[Path]:
    from playwright.sync_api import sync_playwright

    db_url = f"sqlite:///{vtag_home / 'vtag.db'}"
    pages = _pages(db_url)
    out.mkdir(parents=True, exist_ok=True)
    taken = []
    with tempfile.TemporaryDirectory(prefix="vtag-screenshots-") as root:
        with local_airflow(Path(root), vtag_home=vtag_home, VTAG_NIGHTLY_CRON="", VTAG_INGEST_CRON="") as airflow:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
                for theme in THEMES:
                    context = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme=theme)
                    # Airflow's stored colour mode decides before the system's (airflow_glue/ui/templates/base.html)
                    context.add_init_script(
                        f"try {{ localStorage.setItem('chakra-ui-color-mode', '{theme}'); "
                        f"localStorage.setItem('theme', '{theme}'); }} catch (e) {{}}"
                    )
                    page = context.new_page()
                    page.set_default_timeout(UI_TIMEOUT_MS)
                    log_in(page, airflow)
                    for name, path in pages.items():
                        page.goto(airflow.url + path)
                        page.wait_for_load_state("networkidle")
                        shot = out / f"{name}-{theme}.png"
                        page.screenshot(path=str(shot), full_page=True)
                        taken.append(shot)
                        print(f"screenshot: {shot}", flush=True)
                    context.close()
                browser.close()
    return taken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vtag-home", type=Path, required=True, help="the demo's VTAG_HOME (make demo: .demo)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    args = parser.parse_args(argv)
    if not (args.vtag_home / "vtag.db").is_file():
        parser.error(f"{args.vtag_home / 'vtag.db'} does not exist: run `make demo` first")
    take(args.vtag_home.resolve(), args.out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
