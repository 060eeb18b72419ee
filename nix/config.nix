# The JSON configuration of impermanence_boot.py, as a pure function.
#
# Only Nix builtins are used (no nixpkgs `lib`), so this file can be
# evaluated on any machine with a `nix-instantiate`:
#
#   nix-instantiate --eval --strict --json -E \
#     'import ./nix/config.nix { persistence = { ... }; users = { ... }; }'
#
# Arguments
#   persistence    the value of `environment.persistence`, either as written
#                  in a configuration (items as strings or attribute sets,
#                  defaults left out) or as the NixOS module system returns
#                  it (every option filled in, internal options included).
#   users          `users.users`: name -> { uid, group, home, isNormalUser, ... }
#   groups         `users.groups`: name -> { gid, ... }
#   fileSystems    persistent filesystems the script mounts itself:
#                  mountpoint -> { device | label, fsType ? "auto", options ? [ ] }
#   deviceTimeout  seconds to wait for those devices
#   root           null, or the btrfs root rotation of `rotate-root`:
#                  { device, subvolume, oldRoots, keep = { days, count }, blank }
#
# The result is an attribute set for `builtins.toJSON`, with every default
# filled in the way NixOS impermanence fills it:
#   - a location's persistentStoragePath defaults to its name; disabled
#     locations are left out;
#   - directories: user root, group root, mode 0755 at system level;
#     at users.<name> level the user, the user's primary group, 0755;
#   - files: method "auto"; parentDirectory only when it differs from the
#     level's defaults, the fields that do not filled with those (so that a
#     file directly in a home directory leaves the home's own 0700 alone);
#   - users.<name>.home defaults to users.users.<name>.home, else
#     /home/<name>, and must agree with users.users.<name>.home;
#   - paths are tidied as NixOS impermanence's lib.nix does: empty
#     components dropped ("/var/lib/foo/", "a//b"), a system-level path
#     made absolute, a user-level one relative to the home ("/Downloads"
#     is "Downloads"; "/" is the whole home, written "/").
# An item's own `persistentStoragePath`, `hideMount` and `allowTrash` are
# kept only where they differ from its location's; other internal options
# are dropped.  The options NixOS impermanence removed (`allowOther`,
# `removePrefixDirectory`, `defaultDirectoryMethod`, a directory's
# `method`, users.<name>.home) throw when its evaluated option is read:
# such throwing values count as not set.
# Errors (unknown options, wrong types, the same path listed twice) abort
# the evaluation with a message naming the option.
{ persistence ? { }
, users ? { }
, groups ? { }
, fileSystems ? { }
, deviceTimeout ? 30
, root ? null
}:

let
  inherit (builtins)
    attrNames concatMap concatStringsSep filter foldl' hasAttr isAttrs
    isBool isInt isList isString length listToAttrs map mapAttrs throw
    toJSON typeOf elem head removeAttrs;

  fail = where: msg: throw "impermanence-boot: ${where}: ${msg}";

  q = toJSON; # quote a name for messages: "/persistent"

  optionalAttrs = cond: set: if cond then set else { };
  nonEmptyStr = x: isString x && x != "";

  # The value of an attribute, null when it is missing or throws (an
  # option NixOS impermanence removed, read from its evaluated config).
  given = set: key:
    if !(set ? ${key}) then null
    else let r = builtins.tryEval set.${key}; in if r.success then r.value else null;

  # ---- paths, as NixOS impermanence's lib.nix concatPaths ------------------

  components = path: filter (s: isString s && s != "") (builtins.split "/" path);
  systemPath = path: "/" + concatStringsSep "/" (components path);
  userPath = path: let c = components path; in if c == [ ] then "/" else concatStringsSep "/" c;

  # Keys the NixOS module system fills in on its own (internal options of
  # NixOS impermanence and of this project's module, and `_module`, which
  # every evaluated submodule carries).  Accepted, not used.
  internalItemKeys = [ "dirPath" "filePath" "home" "defaultPerms" "enableDebugging" "assertions" "_module" ];
  internalParentKeys = internalItemKeys
    ++ [ "directory" "persistentStoragePath" "hideMount" "allowTrash" "method" "user" "group" "mode" ];

  removedLocationKeys = {
    allowOther = "real bind mounts are used, `allowOther' is not needed";
    removePrefixDirectory = "prefix directories are not supported";
    defaultDirectoryMethod = "directories are always bind mounted";
  };

  checkKeys = where: allowed: set:
    let unknown = filter (k: !(elem k allowed)) (attrNames set);
    in
    if unknown == [ ] then set
    else fail "${where}.${head unknown}"
      "unknown option (known: ${concatStringsSep ", " allowed})";

  str = where: x:
    if isString x then x
    else fail where "expected a string, got ${typeOf x}";

  optStr = where: x: if x == null then null else str where x;

  bool = where: x:
    if isBool x then x
    else fail where "expected true or false, got ${typeOf x}";

  list = where: x:
    if isList x then x
    else fail where "expected a list, got ${typeOf x}";

  attrs = where: x:
    if isAttrs x then x
    else fail where "expected an attribute set, got ${typeOf x}";

  # ---- accounts -----------------------------------------------------------

  userEntry = name: users.${name} or { };
  isNormal = name: (userEntry name).isNormalUser or false;

  # NixOS: users.users.<name>.group, "users" for normal users.
  primaryGroup = name:
    let g = (userEntry name).group or null;
    in
    if nonEmptyStr g then g
    else if isNormal name then "users"
    else null;

  # NixOS: users.users.<name>.home, /home/<name> for normal users.
  accountHome = name:
    let h = (userEntry name).home or null;
    in
    if nonEmptyStr h then toString h
    else if isNormal name then "/home/${name}"
    else null;

  # ---- items ----------------------------------------------------------------

  # ctx: { where, storage, hide, defaults = { user, group, mode } }
  fillPerms = ctx: where: set: {
    user = let u = set.user or null; in
      if u == null then ctx.defaults.user else str "${where}.user" u;
    mode = let m = set.mode or null; in
      if m == null then ctx.defaults.mode else str "${where}.mode" m;
  } // (
    let g = set.group or null;
      group = if g == null then ctx.defaults.group else str "${where}.group" g;
    in optionalAttrs (group != null) { inherit group; }
  );

  # An item stored somewhere else than its location keeps its own
  # persistentStoragePath; otherwise the key is left out.
  storageOf = ctx: where: item:
    let p = item.persistentStoragePath or null;
    in optionalAttrs (p != null && toString p != ctx.storage) {
      persistentStoragePath = str "${where}.persistentStoragePath" (toString p);
    };

  # hideMount, allowTrash: kept where they differ from the location's.
  mountFlags = ctx: where: item:
    let
      flag = key: default:
        let v = item.${key} or null; in
        optionalAttrs (v != null && bool "${where}.${key}" v != default) { ${key} = v; };
    in
    flag "hideMount" ctx.hide // flag "allowTrash" ctx.trash;

  normDir = ctx: i: raw:
    let
      where = "${ctx.where}.directories.${toString i}";
      item = if isString raw then { directory = raw; }
        else
          checkKeys where
            ([ "directory" "user" "group" "mode" "persistentStoragePath" "hideMount" "allowTrash" "method" ] ++ internalItemKeys)
            (if isAttrs raw && given raw "method" != null
             then fail "${where}.method" "directories are always bind mounted; `method' exists for files only"
             else attrs where raw);
      written =
        if item ? directory then str "${where}.directory" item.directory
        else fail where "`directory' is missing";
      directory = ctx.norm written;
    in
    {
      kind = "directories";
      path = directory;
      value = { inherit directory; } // fillPerms ctx where item // storageOf ctx where item
        // mountFlags ctx where item;
    };

  methods = [ "auto" "symlink" ];

  normFile = ctx: i: raw:
    let
      where = "${ctx.where}.files.${toString i}";
      item = if isString raw then { file = raw; }
        else
          checkKeys where
            ([ "file" "method" "parentDirectory" "persistentStoragePath" ] ++ internalItemKeys)
            (attrs where raw);
      file = ctx.norm (
        if item ? file then str "${where}.file" item.file
        else fail where "`file' is missing");
      method =
        let m = item.method or null; in
        if m == null then "auto"
        else if elem m methods then m
        else fail "${where}.method" "expected one of ${toJSON methods}, got ${toJSON m}";
      pwhere = "${where}.parentDirectory";
      parent =
        let p = item.parentDirectory or null; in
        if p == null then { }
        else checkKeys pwhere internalParentKeys (attrs pwhere p);
      # Only what differs from the level's defaults (both modules fill
      # them in; NixOS impermanence keeps its own as defaultPerms): the
      # same as those is the same as none given.
      defaults = parent.defaultPerms or null;
      sameAsDefaults = isAttrs defaults
        && builtins.all (k: (parent.${k} or null) == (defaults.${k} or null)) [ "user" "group" "mode" ];
      parentSet = if sameAsDefaults then [ ]
        else filter (k: (parent.${k} or null) != null && parent.${k} != (ctx.defaults.${k} or null)) [ "user" "group" "mode" ];
    in
    {
      kind = "files";
      path = file;
      value = { inherit file method; }
        // storageOf ctx where item
        // optionalAttrs (parentSet != [ ]) {
        parentDirectory = fillPerms ctx pwhere parent;
      };
    };

  imap = f: xs:
    let n = length xs;
    in builtins.genList (i: f i (builtins.elemAt xs i)) n;

  # ---- locations ------------------------------------------------------------

  locationKeys = [ "enable" "persistentStoragePath" "hideMounts" "allowTrash" "directories" "files" "users" ]
    ++ [ "enableDebugging" "enableWarnings" "assertions" "_module" ]
    ++ attrNames removedLocationKeys;
  userLocationKeys = [ "directories" "files" "home" "enableDebugging" "assertions" "_module" ];

  systemDefaults = { user = "root"; group = "root"; mode = "0755"; };

  normLocation = name:
    let
      where = "environment.persistence.${q name}";
      loc0 = attrs where persistence.${name};
      loc =
        let removed = filter (k: hasAttr k removedLocationKeys && given loc0 k != null) (attrNames loc0);
        in
        if removed != [ ] then
          fail "${where}.${head removed}" "this option was removed from NixOS impermanence: ${removedLocationKeys.${head removed}}"
        else checkKeys where locationKeys loc0;
      enable = let e = loc.enable or null; in if e == null then true else bool "${where}.enable" e;
      storage = let p = loc.persistentStoragePath or null; in
        if p == null then name else toString p;
      hide = let h = loc.hideMounts or null; in if h == null then false else bool "${where}.hideMounts" h;
      trash = let t = loc.allowTrash or null; in if t == null then false else bool "${where}.allowTrash" t;

      sysCtx = { inherit where storage hide trash; norm = systemPath; defaults = systemDefaults; };

      sysEntries =
        imap (normDir sysCtx) (list "${where}.directories" (loc.directories or [ ]))
        ++ imap (normFile sysCtx) (list "${where}.files" (loc.files or [ ]));

      locUsers = attrs "${where}.users" (loc.users or { });

      userHome = u:
        let
          uwhere = "${where}.users.${q u}";
          home = given locUsers.${u} "home";
          account = accountHome u;
        in
        if home == null then (if account != null then account else "/home/${u}")
        else if account != null && toString home != account then
          fail "${uwhere}.home"
            "${toJSON (toString home)} differs from users.users.${q u}.home = ${toJSON account}; set both to the same directory"
        else str "${uwhere}.home" (toString home);

      userEntries = concatMap
        (u:
          let
            uwhere = "${where}.users.${q u}";
            set = checkKeys uwhere userLocationKeys (attrs uwhere locUsers.${u});
            ctx = {
              where = uwhere;
              inherit storage hide trash;
              norm = userPath;
              defaults = { user = u; group = primaryGroup u; mode = "0755"; };
            };
            tag = e: e // { user = u; home = userHome u; };
          in
          map tag (
            imap (normDir ctx) (list "${uwhere}.directories" (set.directories or [ ]))
            ++ imap (normFile ctx) (list "${uwhere}.files" (set.files or [ ]))
          ))
        (attrNames locUsers);

      entries = map (e: { user = null; home = null; } // e) sysEntries ++ userEntries;

      pick = kind: user:
        map (e: e.value) (filter (e: e.kind == kind && e.user == user) entries);

      json = {
        enable = true;
        persistentStoragePath = storage;
        hideMounts = hide;
        allowTrash = trash;
        directories = pick "directories" null;
        files = pick "files" null;
        users = mapAttrs
          (u: _: {
            home = userHome u;
            directories = pick "directories" u;
            files = pick "files" u;
          })
          locUsers;
      };
    in
    {
      inherit name enable entries;
      locations = if enable then [{ inherit name; value = json; }] else [ ];
      homes = listToAttrs (map (u: { name = u; value = userHome u; })
        (if enable then attrNames locUsers else [ ]));
    };

  locations = map normLocation (attrNames (attrs "environment.persistence" persistence));
  enabled = filter (l: l.enable) locations;

  # ---- the same target listed twice -----------------------------------------

  targetOf = e:
    if e.user == null then e.path
    else if e.path == "/" then e.home
    else "${e.home}/${e.path}";
  described = l: e:
    "environment.persistence.${q l.name}"
    + (if e.user == null then "" else ".users.${q e.user}")
    + ".${e.kind} ${toJSON e.path}";
  allTargets = concatMap (l: map (e: { target = targetOf e; what = described l e; }) l.entries) enabled;
  byTarget = builtins.groupBy (t: t.target) allTargets;
  duplicated = filter (t: length byTarget.${t} > 1) (attrNames byTarget);
  checkDuplicates =
    if duplicated == [ ] then true
    else
      let t = head duplicated;
      in fail "environment.persistence"
        "${toJSON t} is listed more than once: ${concatStringsSep " and " (map (x: x.what) byTarget.${t})}";

  # ---- account tables -------------------------------------------------------

  persistenceHomes = foldl' (acc: l: acc // l.homes) { } enabled;

  userTable = listToAttrs (map
    (name:
      let
        u = userEntry name;
        uid = u.uid or null;
        group = primaryGroup name;
        home =
          let a = accountHome name; in
          if a != null then a else persistenceHomes.${name} or null;
      in
      {
        inherit name;
        value =
          optionalAttrs (uid != null) {
            uid = if isInt uid then uid else fail "users.users.${q name}.uid" "expected an integer or null, got ${typeOf uid}";
          }
          // optionalAttrs (group != null) { inherit group; }
          // optionalAttrs (home != null) { inherit home; };
      })
    (attrNames (users // persistenceHomes)));

  groupTable = mapAttrs
    (name: g:
      let gid = (attrs "users.groups.${q name}" g).gid or null;
      in
      optionalAttrs (gid != null) {
        gid = if isInt gid then gid else fail "users.groups.${q name}.gid" "expected an integer or null, got ${typeOf gid}";
      })
    groups;

  # ---- filesystems ----------------------------------------------------------

  fsTable = mapAttrs
    (mountPoint: fs0:
      let
        where = "fileSystems.${q mountPoint}";
        fs = checkKeys where [ "device" "label" "fsType" "options" ] (attrs where fs0);
        device =
          if (fs.device or null) != null then str "${where}.device" fs.device
          else if (fs.label or null) != null then "LABEL=${str "${where}.label" fs.label}"
          else fail where "`device' (or `label') is missing";
        options = fs.options or [ ];
      in
      {
        inherit device;
        fsType = let t = fs.fsType or null; in if t == null then "auto" else str "${where}.fsType" t;
        options =
          if isString options then options
          else map (str "${where}.options") (list "${where}.options" options);
      })
    fileSystems;

in
assert checkDuplicates;
{
  fileSystems = fsTable;
  deviceTimeout =
    if isInt deviceTimeout && deviceTimeout >= 0 then deviceTimeout
    else fail "deviceTimeout" "expected a non-negative integer, got ${toJSON deviceTimeout}";
  users = userTable;
  groups = groupTable;
  persistence = listToAttrs (concatMap (l: l.locations) enabled);
} // optionalAttrs (root != null) {
  root = checkKeys "root" [ "device" "subvolume" "oldRoots" "keep" "blank" ] (attrs "root" root);
}
