// Infinite scroll: fetch the next page from the JSON API when the "More" link comes into view.
(function () {
  const next = document.getElementById("next"), grid = document.getElementById("grid");
  if (!next || !("IntersectionObserver" in window)) return;
  let page = Number(grid.dataset.page), loading = false;
  const api = grid.dataset.api.includes("?") && grid.dataset.api.split("?")[1] ? grid.dataset.api + "&" : "/api/gallery?";
  const observer = new IntersectionObserver(async (entries) => {
    if (!entries[0].isIntersecting || loading) return;
    loading = true;
    const response = await fetch(`${api}period=${grid.dataset.period}&page=${page + 1}&per_page=${grid.dataset.perPage}`);
    const data = await response.json();
    for (const item of data.items) {
      // The same markup as the server's cards above.
      const card = document.createElement("a");
      card.className = "card"; card.href = item.url; card.dataset.id = item.id;
      const img = document.createElement("img");
      img.src = item.thumbnail; img.alt = item.prompt; img.loading = "lazy"; img.width = item.width; img.height = item.height;
      const meta = document.createElement("div"); meta.className = "meta";
      const prompt = document.createElement("div"); prompt.className = "prompt"; prompt.textContent = item.prompt;
      meta.append(prompt, `▲ ${item.up} · ▼ ${item.down} · ${item.model}`);
      card.append(img, meta); grid.append(card);
    }
    page += 1; loading = false;
    next.href = next.href.replace(/([?&])page=\d+/, `$1page=${page + 1}`);
    if (!data.more) { observer.disconnect(); next.remove(); return; }
    // Still in view (a short page): observing again reports it at once, and the next page loads.
    observer.unobserve(next); observer.observe(next);
  });
  observer.observe(next);
})();
