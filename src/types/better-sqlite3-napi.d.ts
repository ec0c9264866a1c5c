// better-sqlite3 13 installed under an alias; its API is the one @types/better-sqlite3 describes.
declare module "better-sqlite3-napi" {
  import Database from "better-sqlite3";
  export default Database;
}
