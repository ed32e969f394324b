// Renders TeX to HTML with KaTeX, for docs/_tooling/katex_render.py (the docs build).
// Usage: node katex_render.js KATEX_JS < items.json > rendered.json
// Input: a JSON list of {"tex": "...", "display": true|false}.
// Output: {"html": [string|null, ...], "errors": ["item N: message", ...]}; the build
// fails on any error, so a typo in a docstring's maths never reaches the site as raw TeX.
"use strict";

const katex = require(process.argv[2]);

let input = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => {
  input += chunk;
});
process.stdin.on("end", () => {
  const items = JSON.parse(input);
  const html = [];
  const errors = [];
  items.forEach((item, index) => {
    try {
      html.push(
        katex.renderToString(item.tex, {
          displayMode: item.display,
          throwOnError: true,
          strict: "error",
          output: "htmlAndMathml",
        }),
      );
    } catch (error) {
      html.push(null);
      errors.push(`item ${index}: ${error.message}`);
    }
  });
  process.stdout.write(JSON.stringify({ html, errors }));
});
