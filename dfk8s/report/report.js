(() => {
  "use strict";
  const cards = Array.from(document.querySelectorAll("#gallery .card"));
  const haystacks = cards.map((card) =>
    Array.from(card.querySelectorAll(".searchable"), (el) => el.textContent).join("\n").toLowerCase());
  const buttons = Array.from(document.querySelectorAll("[data-filter]"));
  const search = document.getElementById("search");
  const shown = document.getElementById("shown");
  const empty = document.getElementById("empty");
  let filter = "all";

  function matches(card) {
    if (filter === "ok" || filter === "failed") return card.dataset.status === filter;
    if (filter.startsWith("error:")) return card.dataset.error === filter.slice("error:".length);
    return true;
  }

  function apply() {
    const query = search.value.trim().toLowerCase();
    let count = 0;
    cards.forEach((card, i) => {
      const show = matches(card) && (!query || haystacks[i].includes(query));
      card.hidden = !show;
      if (show) count += 1;
    });
    shown.textContent = count.toLocaleString("en");
    empty.hidden = count > 0;
    buttons.forEach((b) => {
      const on = b.dataset.filter === filter;
      b.classList.toggle("active", on);
      b.setAttribute("aria-pressed", on ? "true" : "false");
    });
  }

  buttons.forEach((b) => b.addEventListener("click", () => {
    filter = b.dataset.filter === filter && filter !== "all" ? "all" : b.dataset.filter;
    apply();
  }));
  search.addEventListener("input", apply);
  apply();
})();
