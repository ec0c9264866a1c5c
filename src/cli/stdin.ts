import { text } from "node:stream/consumers";

/** All of stdin as text, trimmed; a prompt goes to stderr first when a person is typing. */
export async function readStdin(prompt: string): Promise<string> {
  if (process.stdin.isTTY) process.stderr.write(prompt);
  return (await text(process.stdin)).trim();
}
