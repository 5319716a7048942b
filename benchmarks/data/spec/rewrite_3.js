// A small to-do list kept in the browser's local storage.
const STORAGE_KEY = "todo-items";

function loadItems() {
  const raw = window.localStorage.getItem(STORAGE_KEY);
  if (!raw) {
    return [];
  }
  try {
    return JSON.parse(raw);
  } catch (error) {
    console.warn("could not read the saved items", error);
    return [];
  }
}

function saveItems(items) {
  window.localStorage.setItem(STORAGE_KEY, JSON.stringify(items));
}

function addItem(items, title) {
  const trimmed = title.trim();
  if (trimmed.length === 0) {
    return items;
  }
  const item = { id: Date.now(), title: trimmed, done: false };
  return [...items, item];
}

function toggleItem(items, id) {
  return items.map((item) => (item.id === id ? { ...item, done: !item.done } : item));
}

function removeDone(items) {
  return items.filter((item) => !item.done);
}

function render(items, list) {
  list.innerHTML = "";
  for (const item of items) {
    const row = document.createElement("li");
    row.textContent = item.title;
    if (item.done) {
      row.classList.add("done");
    }
    row.addEventListener("click", () => {
      const next = toggleItem(items, item.id);
      saveItems(next);
      render(next, list);
    });
    list.appendChild(row);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const list = document.querySelector("#items");
  const form = document.querySelector("#new-item");
  let items = loadItems();
  render(items, list);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    items = addItem(items, form.elements.title.value);
    saveItems(items);
    render(items, list);
    form.reset();
  });
});
