// Open the notebook in JupyterLab in headless Chromium, run all cells, check that the widgets rendered,
// and screenshot the photo grid, the training view and the comparison grid.
//   node screenshots.cjs URL OUT_DIR [TIMEOUT_MS]
// Started by run_in_browser.py, which starts JupyterLab (with expose_app_in_browser) and fills in the parameters.
const fs = require("fs");
const path = require("path");
const { chromium } = require("playwright-core");

const [url, outDir, timeoutArg] = process.argv.slice(2);
const timeout = Number(timeoutArg || 900000);
const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--disable-dev-shm-usage"];  // containers give /dev/shm 64 MB, too little for the renderer
// The cell of each screenshot, found by the library call in its source.
const SHOTS = { "photos.png": "dreamnb.ui.photos(", "training.png": "dreamnb.ui.train(", "compare.png": "dreamnb.ui.compare(" };
const BUTTONS = ["Load model", "Create session", "Prepare photos", "Train", "Stop", "Resume", "Make the grid", "Export"];

function fail(message) {
  console.error(`page check failed: ${message}`);
  process.exitCode = 1;
}

(async () => {
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", headless: true, args: FLAGS });
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
    page.on("crash", () => fail("the page crashed"));
    page.setDefaultTimeout(120000);
    await page.goto(url);
    await page.waitForSelector(".jp-Notebook .jp-CodeCell");
    // The kernel must be up before "run all", or the first cells race its start.
    await page.waitForFunction(() => {
      const widget = window.jupyterapp && window.jupyterapp.shell.currentWidget;
      const kernel = widget && widget.sessionContext && widget.sessionContext.session && widget.sessionContext.session.kernel;
      return kernel && kernel.status === "idle";
    }, null, { timeout: 120000 });
    const started = Date.now();
    // Not awaited inside the page: the command's promise only settles when every cell has run.
    await page.evaluate(() => { window.jupyterapp.commands.execute("notebook:run-all-cells"); });
    // Done when the export section reports its file, or failed when a cell shows an error.
    const done = page.getByText(/Exported attempt-1 to /).first();
    const failed = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']", { hasText: /StepFailed|Error/ }).first();
    await Promise.race([done.waitFor({ timeout }), failed.waitFor({ timeout })]);
    if (await failed.isVisible().catch(() => false)) {
      fail(`a cell failed: ${(await failed.innerText()).slice(0, 400)}`);
    }
    const seconds = Math.round((Date.now() - started) / 1000);

    // What rendered: widget views, the buttons of every section, thumbnails, chart and grid images.
    const check = await page.evaluate(() => {
      const buttons = [...document.querySelectorAll("button.jupyter-button")].map((b) => b.textContent.trim());
      const images = (source) => {
        const cell = [...document.querySelectorAll(".jp-CodeCell")].find((c) => c.textContent.includes(source));
        return cell ? [...cell.querySelectorAll(".jp-Cell-outputWrapper img")].filter((i) => i.naturalWidth > 0).map((i) => [i.naturalWidth, i.naturalHeight]) : [];
      };
      return {
        widget_views: document.querySelectorAll(".jp-Cell-outputWrapper .jupyter-widgets").length,
        buttons,
        photo_images: images("dreamnb.ui.photos("),
        training_images: images("dreamnb.ui.train("),
        compare_images: images("dreamnb.ui.compare("),
        progress: [...document.querySelectorAll(".widget-hprogress .progress-bar")].map((b) => b.style.width),
      };
    });
    check.seconds = seconds;
    for (const name of BUTTONS) {
      if (!check.buttons.some((b) => b === name || b.endsWith(name))) fail(`no '${name}' button rendered`);
    }
    if (check.widget_views < 8) fail(`only ${check.widget_views} widget views rendered`);
    if (check.photo_images.length < 6) fail(`the photo grid shows ${check.photo_images.length} images, expected the 6 cat photos`);
    if (check.training_images.length < 3) fail("the training view shows no loss curve and previews");
    if (check.compare_images.length < 1) fail("the compare view shows no grid");

    fs.mkdirSync(outDir, { recursive: true });
    // Tall enough that each section's output fits whole, without the Lab's toolbars over it.
    await page.setViewportSize({ width: 1400, height: 3200 });
    for (const [file, source] of Object.entries(SHOTS)) {
      const output = page.locator(".jp-CodeCell", { hasText: source }).first().locator(".jp-Cell-outputWrapper");
      await output.scrollIntoViewIfNeeded();
      await output.screenshot({ path: path.join(outDir, file) });
    }
    // The last line of stdout is the page check, for the pytest test to read.
    console.log(JSON.stringify({ ...check, screenshots: Object.keys(SHOTS) }));
  } finally {
    await browser.close();
  }
})().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});
