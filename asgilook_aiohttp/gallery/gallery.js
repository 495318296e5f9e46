// The gallery: uploads with progress, a grid of thumbnails newest first, one image at a time.
const $ = (id) => document.getElementById(id);
const grid = $("grid"), more = $("more"), status = $("status"), viewer = $("viewer");
const PAGE = 48; // tiles added each time the end of the grid comes into view
const MIN_SIDE = 64;
const WRITE_TOKEN = "asgilook.write-token";
const deleteKey = (id) => `asgilook.delete.${id}`;
const shown = new Set();
let next = `/images?order=newest&limit=${PAGE}`; // the list's next page, while there is one
let reading = false;
let current = null; // the image in the viewer

const sizeOf = (url) => url.match(/(\d+)x(\d+)\.jpeg$/).slice(1).map(Number);
const tokenFor = (id) => localStorage.getItem(deleteKey(id)) ?? localStorage.getItem(WRITE_TOKEN);
const describe = (image) =>
  `Image of ${image.size[0]} × ${image.size[1]} pixels, uploaded ${new Date(image.modified).toLocaleString()}`;

async function detail(response) {
  try {
    return (await response.json()).detail;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function tile(image) {
  const [smallest] = image.thumbnails.filter((url) => Math.min(...sizeOf(url)) >= MIN_SIDE).slice(-1);
  const img = document.createElement("img");
  img.loading = "lazy";
  img.alt = describe(image);
  img.src = smallest ?? image.image;
  [img.width, img.height] = smallest ? sizeOf(smallest) : image.size;
  if (smallest) {
    // A sharp tile on any screen: the browser takes the smallest thumbnail that fills it.
    img.srcset = image.thumbnails.map((url) => `${url} ${sizeOf(url)[0]}w`).join(", ");
    img.sizes = "(max-width: 30rem) 33vw, 12rem";
  }
  const link = document.createElement("a");
  link.href = image.image;
  link.append(img);
  link.addEventListener("click", (event) => {
    event.preventDefault();
    open(image);
  });
  const item = document.createElement("li");
  item.id = `image-${image.id}`;
  item.append(link);
  shown.add(image.id);
  return item;
}

function showEmpty() {
  status.textContent = grid.children.length || next ? "" : "No images yet.";
}

const observer = new IntersectionObserver((entries) => {
  if (entries.some((entry) => entry.isIntersecting)) showMore();
}, { rootMargin: "50%" });

// The list, newest first, a page at a time as the end of the grid comes into view.
async function showMore() {
  if (reading || !next) return;
  reading = true;
  try {
    const response = await fetch(next, { headers: { Accept: "application/json" } });
    if (!response.ok) {
      status.textContent = `The list could not be read: ${await detail(response)}`;
      next = null; // not asked again and again while the end stays in view
      return;
    }
    const page = await response.json();
    next = response.headers.get("Link")?.match(/<([^>]+)>\s*;\s*rel="?next"?/)?.[1];
    grid.append(...page.filter((image) => !shown.has(image.id)).map(tile));
    showEmpty();
  } finally {
    reading = false;
    // Observing again reports at once whether the end is still in view.
    observer.unobserve(more);
    if (next) observer.observe(more);
  }
}

let asking = null; // one question for every upload refused at once

function askToken(refused) {
  if (localStorage.getItem(WRITE_TOKEN) !== refused) return Promise.resolve(true);
  asking ??= new Promise((resolve) => {
    const dialog = $("ask-token"), input = $("token");
    input.value = "";
    dialog.returnValue = "";
    dialog.addEventListener("close", () => {
      asking = null;
      const token = dialog.returnValue === "save" && input.value.trim();
      if (token) localStorage.setItem(WRITE_TOKEN, token);
      else localStorage.removeItem(WRITE_TOKEN);
      resolve(Boolean(token));
    }, { once: true });
    dialog.showModal();
  });
  return asking;
}

function upload(file) {
  const row = document.createElement("li");
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = file.name;
  const bar = document.createElement("progress");
  bar.max = 1;
  bar.value = 0;
  bar.setAttribute("aria-label", `Uploading ${file.name}`);
  const note = document.createElement("output");
  row.append(name, bar, note);
  $("uploads").prepend(row);
  send(file, bar, note);
}

function send(file, bar, note) {
  const token = localStorage.getItem(WRITE_TOKEN);
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/images");
  xhr.setRequestHeader("Accept", "application/json");
  if (token) xhr.setRequestHeader("Authorization", `Bearer ${token}`);
  xhr.responseType = "json";
  xhr.upload.addEventListener("progress", (event) => {
    if (event.lengthComputable) [bar.max, bar.value] = [event.total, event.loaded];
  });
  xhr.upload.addEventListener("load", () => (note.textContent = "Converting…"));
  xhr.addEventListener("load", async () => {
    if (xhr.status === 201) {
      bar.value = bar.max;
      note.textContent = "Uploaded";
      localStorage.setItem(deleteKey(xhr.response.id), xhr.response.delete_token);
      if (!shown.has(xhr.response.id)) grid.prepend(tile(xhr.response));
      showEmpty();
    } else if ((xhr.status === 401 || (xhr.status === 403 && token)) && (await askToken(token))) {
      send(file, bar, note);
    } else {
      fail(note, xhr.response?.detail ?? `${xhr.status} ${xhr.statusText}`);
    }
  });
  xhr.addEventListener("error", () => fail(note, "The connection failed before the server answered."));
  note.classList.remove("error");
  note.textContent = "Uploading…";
  xhr.send(file);
}

function fail(note, text) {
  note.textContent = text;
  note.classList.add("error");
}

function uploadAll(files) {
  for (const file of files) upload(file);
}

function open(image) {
  current = image;
  const large = $("large"), when = $("when");
  large.src = image.thumbnails[0] ?? image.image;
  [large.width, large.height] = image.thumbnails.length ? sizeOf(image.thumbnails[0]) : image.size;
  large.alt = describe(image);
  $("original").href = image.image;
  $("original").textContent = `The original, ${image.size[0]} × ${image.size[1]} pixels`;
  when.dateTime = new Date(image.modified).toISOString();
  when.textContent = new Date(image.modified).toLocaleString();
  $("delete").hidden = !tokenFor(image.id);
  $("link").hidden = true;
  $("viewer-status").textContent = "";
  viewer.showModal();
}

async function copyLink() {
  const url = new URL(current.image, location.href).href;
  const say = (text) => ($("viewer-status").textContent = text);
  try {
    await navigator.clipboard.writeText(url);
    say("Link copied.");
  } catch {
    // No clipboard API outside a secure context (plain HTTP beyond localhost): select the
    // link in a field, and copy it the old way or let the user.
    const field = $("link");
    field.value = url;
    field.hidden = false;
    field.select();
    say(document.execCommand("copy") ? "Link copied." : "Press Ctrl+C to copy the selected link.");
  }
}

async function remove() {
  const { id } = current;
  if (!confirm("Delete this image? This cannot be undone.")) return;
  const response = await fetch(`/images/${id}`, {
    method: "DELETE",
    headers: { Authorization: `Bearer ${tokenFor(id)}` },
  });
  // 404: only the write token learns that it was gone already.
  if (response.status !== 204 && response.status !== 404) {
    $("viewer-status").textContent = await detail(response);
    return;
  }
  localStorage.removeItem(deleteKey(id));
  const item = $(`image-${id}`);
  const neighbour = item.nextElementSibling ?? item.previousElementSibling;
  item.remove();
  viewer.close();
  neighbour?.querySelector("a").focus();
  showEmpty();
}

const drop = $("drop");
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  drop.classList.remove("over");
  uploadAll(event.dataTransfer.files);
});
// A file dropped beside the zone would have the browser leave the page to show it.
for (const type of ["dragover", "drop"]) window.addEventListener(type, (event) => event.preventDefault());
$("files").addEventListener("change", (event) => {
  uploadAll(event.target.files);
  event.target.value = "";
});
$("copy").addEventListener("click", copyLink);
$("delete").addEventListener("click", remove);
$("close").addEventListener("click", () => viewer.close());
viewer.addEventListener("click", (event) => event.target === viewer && viewer.close());
showMore().catch(() => (status.textContent = "The list could not be read: the server did not answer."));
