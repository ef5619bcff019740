// The job page: live progress over server-sent events, and the owner's Cancel button.
(function () {
  const jobId = document.getElementById("job").dataset.id;
  const csrf = document.querySelector('meta[name="csrf-token"]');
  const cancel = document.getElementById("cancel");
  if (cancel && csrf) cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    const response = await fetch(`/api/jobs/${jobId}/cancel`, {
      method: "POST", headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf.content}, body: "{}",
    });
    const answer = await response.json();
    document.getElementById("cancel-message").textContent = response.ok
      ? (answer.status === "running" ? "stopping at the next step…" : answer.status) : answer.error;
  });
  const events = new EventSource(`/jobs/${jobId}/events`);
  events.onmessage = (message) => {
    const event = JSON.parse(message.data);
    const status = document.getElementById("status");
    if (event.kind === "status") status.textContent = event.status + (event.position != null ? ` · position ${event.position}` : "");
    if (event.kind === "step") {
      status.textContent = `step ${event.step} of ${event.total}` + (event.message ? `, ${event.message}` : "");
      const bar = document.getElementById("progress"); bar.max = event.total; bar.value = event.step;
      if (event.preview) { const img = document.getElementById("preview"); img.src = "data:image/png;base64," + event.preview; img.hidden = false; }
    }
    if (["done", "failed", "cancelled"].includes(event.kind)) { events.close(); location.reload(); }
  };
})();
