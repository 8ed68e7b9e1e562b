// Card details rendered to HTML exactly as the CDS Hooks sandbox renders them (sandbox card-list.jsx at 3b7e255:
// <ReactMarkdown remarkPlugins={[remarkGfm]} rehypePlugins={[rehypeRaw]}>{card.detail}</ReactMarkdown>).
// Reads a JSON array of markdown strings on standard input, writes a JSON array of HTML strings.
import { createElement } from "react";
import { renderToStaticMarkup } from "react-dom/server";
import Markdown from "react-markdown";
import rehypeRaw from "rehype-raw";
import remarkGfm from "remark-gfm";

let input = "";
for await (const chunk of process.stdin) input += chunk;
const html = JSON.parse(input).map((detail) =>
  renderToStaticMarkup(createElement(Markdown, { remarkPlugins: [remarkGfm], rehypePlugins: [rehypeRaw] }, detail)),
);
process.stdout.write(JSON.stringify(html));
