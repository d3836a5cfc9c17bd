// Open the notebook in JupyterLab in headless Chromium, run all cells, check that the widgets and the results
// kept as plain outputs rendered, and screenshot the photos, the training view, the comparison grid and the playground.
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
const SHOTS = { "photos.png": "dreamnb.ui.photos(", "training.png": "dreamnb.ui.train(", "compare.png": "dreamnb.ui.compare(",
  "playground.png": "dreamnb.ui.playground(" };
const BUTTONS = ["Load model", "Create session", "Prepare photos", "Train", "Stop", "Resume", "Make the grid", "Generate", "Export"];
const PHOTOS = 8;  // the fish photos in assets/world-photos
const THUMBNAIL_PX = 128;  // dreamnb/ui/photo_view.py: one picture of all the photos, this wide each

function fail(message) {
  console.error(`page check failed: ${message}`);
  process.exitCode = 1;
}

// A press after the cell has run: its images must replace the cell's plain image output in place (a display
// update), as a Colab or Lab user's clicks do. The seed is "random", so the new picture differs from the old.
// Returns how many image outputs the cell then has (1), or -1 when none changed within two minutes.
async function pressGenerateAgain(page) {
  const source = "dreamnb.ui.playground(";
  const outputs = page.locator(".jp-CodeCell", { hasText: source }).first().locator(".jp-OutputArea-output[data-mime-type='image/png']");
  const before = await outputs.first().locator("img").getAttribute("src");
  await page.locator(".jp-CodeCell", { hasText: source }).first().locator("button.jupyter-button", { hasText: "Generate" }).click();
  try {
    await page.waitForFunction(([text, old]) => {
      const cell = [...document.querySelectorAll(".jp-CodeCell")].find((c) => c.textContent.includes(text));
      const img = cell && cell.querySelector(".jp-OutputArea-output[data-mime-type='image/png'] img");
      return img && img.getAttribute("src") !== old;
    }, [source, before], { timeout: 120000 });
  } catch (err) {
    return -1;
  }
  return outputs.count();
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

    // What rendered: widget views, the buttons of every section, and the images of each section's cell (the
    // photos, loss curve, previews, grid and playground images are plain outputs under the widgets).
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
        playground_images: images("dreamnb.ui.playground("),
        progress: [...document.querySelectorAll(".widget-hprogress .progress-bar")].map((b) => b.style.width),
      };
    });
    check.seconds = seconds;
    for (const name of BUTTONS) {
      if (!check.buttons.some((b) => b === name || b.endsWith(name))) fail(`no '${name}' button rendered`);
    }
    if (check.widget_views < 9) fail(`only ${check.widget_views} widget views rendered`);
    if (!check.photo_images.some(([width]) => width >= PHOTOS * THUMBNAIL_PX)) fail(`no picture of the ${PHOTOS} fish photos`);
    if (check.training_images.length < 2) fail("the training cell shows no loss curve and previews");
    if (check.compare_images.length < 1) fail("the compare cell shows no grid");
    if (check.playground_images.length < 1) fail("the playground cell shows no images");
    check.playground_outputs_after_click = await pressGenerateAgain(page);
    if (check.playground_outputs_after_click !== 1) fail("pressing Generate again did not replace the playground's image output");

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
