(function () {
  "use strict";
  // Sortable tables: click (or Enter on) a header; numbers sort by their data-v value.
  var tables = document.querySelectorAll("table.ds-sortable");
  Array.prototype.forEach.call(tables, function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      function sort() {
        // first click: numbers (dead, dead %) largest first, text A to Z; then each click reverses
        var cur = th.getAttribute("aria-sort") || (th.getAttribute("data-first") === "descending" ? "ascending" : "descending");
        var dir = cur === "ascending" ? -1 : 1;
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
        var numeric = th.getAttribute("data-type") === "num";
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = a.cells[col].getAttribute("data-v"), y = b.cells[col].getAttribute("data-v");
          if (numeric) {
            x = x === "" ? -Infinity : parseFloat(x);
            y = y === "" ? -Infinity : parseFloat(y);
            return dir * (x === y ? 0 : (x < y ? -1 : 1));
          }
          return dir * x.localeCompare(y);
        });
        rows.forEach(function (r) { body.appendChild(r); });
      }
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(); } });
    });
  });

  // Figures: each div names the JSON block holding its {data, layout}; plotly.js is loaded once.
  var config = { displaylogo: false, responsive: true, toImageButtonOptions: { format: "svg", scale: 1 },
                 modeBarButtonsToRemove: ["select2d", "lasso2d"] };
  var plots = document.querySelectorAll("div.ds-plot");
  Array.prototype.forEach.call(plots, function (div) {
    var spec = JSON.parse(document.getElementById(div.getAttribute("data-spec")).textContent);
    if (typeof Plotly === "undefined") {
      div.className += " ds-missing";
      div.textContent = "plotly.js did not load, so this figure cannot be drawn (reports made with --plotlyjs cdn need a network connection).";
      return;
    }
    Plotly.newPlot(div, spec.data, spec.layout, config);
  });
})();
