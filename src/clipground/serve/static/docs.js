// Renders this server's OpenAPI document as a plain list (no external scripts).
"use strict";
(async function () {
  const root = document.getElementById("endpoints");
  const spec = await (await fetch("/openapi.json")).json();
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [verb, op] of Object.entries(ops)) {
      const div = document.createElement("div");
      div.className = "ep";
      const h = document.createElement("h3");
      const v = document.createElement("span");
      v.className = "verb";
      v.textContent = verb.toUpperCase();
      h.append(v, document.createTextNode(" " + path));
      const p = document.createElement("p");
      p.textContent = op.summary || "";
      div.append(h, p);
      const content = op.requestBody && op.requestBody.content;
      if (content) {
        for (const [ctype, c] of Object.entries(content)) {
          const t = document.createElement("p");
          t.textContent = "request body, " + ctype + ":";
          const pre = document.createElement("pre");
          pre.textContent = JSON.stringify(c.schema, null, 2);
          div.append(t, pre);
        }
      }
      root.append(div);
    }
  }
})();
