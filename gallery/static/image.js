// The image page: copy the prompt, vote (signed-in members; the CSRF token comes from the page's <meta>).
(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]');
  const imageId = document.getElementById("image").dataset.id;
  const message = document.getElementById("vote-message");
  document.getElementById("copy").addEventListener("click", async (event) => {
    const button = event.currentTarget;
    try { await navigator.clipboard.writeText(button.dataset.prompt); button.textContent = "Copied"; }
    catch (error) { button.textContent = "Select the prompt to copy it"; }
  });
  for (const button of document.querySelectorAll("button.vote")) {
    button.addEventListener("click", async () => {
      if (!csrf) return;
      const value = button.classList.contains("on") ? 0 : Number(button.dataset.value);
      const response = await fetch(`/api/images/${imageId}/vote`, {
        method: "POST", headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf.content},
        body: JSON.stringify({value}),
      });
      const answer = await response.json();
      if (!response.ok) { message.textContent = answer.error; return; }
      document.querySelector("#up span").textContent = answer.up;
      document.querySelector("#down span").textContent = answer.down;
      for (const other of document.querySelectorAll("button.vote")) other.classList.remove("on");
      if (value !== 0) button.classList.add("on");
    });
  }
})();
