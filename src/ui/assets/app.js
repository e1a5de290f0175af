// rbackup ui: the live output of a running operation, over Server-Sent
// Events, and a job page that reloads while its figures are measured.
// Pages work without it (reload by hand).
"use strict";
(function () {
  if (document.getElementById("measuring")) {
    window.setTimeout(function () { window.location.reload(); }, 1500);
  }
})();
(function () {
  var status = document.getElementById("status");
  var output = document.getElementById("output");
  if (!status || !output || !status.dataset.events || !window.EventSource) {
    return;
  }
  var source = new EventSource(status.dataset.events);
  source.addEventListener("line", function (e) {
    output.appendChild(document.createTextNode(e.data + "\n"));
    output.scrollTop = output.scrollHeight;
  });
  source.addEventListener("done", function () {
    source.close();
    // The finished page says the exit code and offers the next step.
    window.location.reload();
  });
})();
