/**
 * Where the userinfo (`user:password@`) of `url` is: from after the scheme's `//` (or the start)
 * up to the last `@`, found in the text so that a URL the parser refuses is covered too. It errs
 * towards hiding too much: an `@` further on (in a path) is taken for the userinfo's end.
 */
function userinfoRange(url: string): { start: number; end: number } | null {
  const end = url.lastIndexOf("@");
  if (end === -1) return null;
  const scheme = /^[a-z][a-z\d+.-]*:\/\//i.exec(url);
  const start = scheme === null ? 0 : scheme[0].length;
  return end < start ? null : { start, end };
}

/** `url` as the CLI prints it: its userinfo, which can hold a password, shown as `***`. */
export function shownUrl(url: string): string {
  const userinfo = userinfoRange(url);
  return userinfo === null ? url : `${url.slice(0, userinfo.start)}***${url.slice(userinfo.end)}`;
}

/** The password in `url`'s userinfo (all of it when there is no `:`), as typed and percent-decoded, for redacting it from an error. */
export function urlPasswords(url: string): string[] {
  const userinfo = userinfoRange(url);
  if (userinfo === null) return [];
  const text = url.slice(userinfo.start, userinfo.end);
  const password = text.slice(text.indexOf(":") + 1);
  let decoded = password;
  try {
    decoded = decodeURIComponent(password);
  } catch {
    // Not valid percent-encoding: the text as typed is what an error would quote.
  }
  return [password, decoded];
}
