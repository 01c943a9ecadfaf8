"""The gateway process: OpenAI's chat-completions API over a deployment's tracks (app, serving, media inputs,
fetching, the LLM client, responses). Imports neither torch nor BentoML."""
