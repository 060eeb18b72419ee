# Evaluates nix/module.nix without nixpkgs, for the tests: a small stand-in
# for the parts of nixpkgs `lib`, `pkgs` and `utils` the module uses, and a
# hand-written `config` (what the module system would pass in).
#
# This is not the NixOS module system: it checks that module.nix refers
# only to things that exist, that its `config` section produces the
# expected initrd wiring (postMountCommands / the systemd service), that
# the JSON it installs is nix/config.nix's output, and which option names
# it declares at each level.  mkIf, mkMerge and mkAfter are resolved
# eagerly with a plain recursive merge.
{ persistence
, users ? { }
, groups ? { }
, impermanence ? { }
, fileSystems ? { }
, systemdInitrd ? false
}:

let
  inherit (builtins)
    attrNames attrValues concatStringsSep filter foldl' isAttrs isList isString
    listToAttrs map mapAttrs elem any all concatMap length head;

  store = name: "/nix/store/00000000000000000000000000000000-${name}";

  fakeDrv = name: extra: { type = "derivation"; outPath = store name; inherit name; } // extra;

  option = attrs: attrs // { _type = "option"; };
  type = name: extra: { _type = "type"; inherit name; } // extra;

  types = {
    str = type "str" { };
    bool = type "bool" { };
    path = type "path" { };
    package = type "package" { };
    unspecified = type "unspecified" { };
    ints = { unsigned = type "unsigned" { }; };
    nullOr = t: type "nullOr" { elem = t; };
    listOf = t: type "listOf" { elem = t; };
    attrsOf = t: type "attrsOf" { elem = t; };
    enum = values: type "enum" { inherit values; };
    coercedTo = from: f: to: type "coercedTo" { inherit from f to; };
    submodule = m: type "submodule" { module = m; };
  };

  escapeShellArg = arg:
    let s = toString arg; in
    if builtins.match "[[:alnum:],._+:@%/-]+" s != null then s
    else "'${builtins.replaceStrings [ "'" ] [ "'\\''" ] s}'";

  lib = {
    inherit types escapeShellArg;
    mkOption = option;
    mkIf = condition: content: { _type = "if"; inherit condition content; };
    mkMerge = contents: { _type = "merge"; inherit contents; };
    mkAfter = content: { _type = "order"; priority = 1500; inherit content; };
    mkDefault = content: { _type = "override"; priority = 1000; inherit content; };
    literalExpression = text: { _type = "literalExpression"; inherit text; };
    inherit mapAttrs attrNames attrValues any all concatStringsSep concatMap filter;
    mapAttrsToList = f: set: map (n: f n set.${n}) (attrNames set);
    filterAttrs = pred: set:
      listToAttrs (map (n: { name = n; value = set.${n}; })
        (filter (n: pred n set.${n}) (attrNames set)));
    optional = cond: x: if cond then [ x ] else [ ];
    optionals = cond: xs: if cond then xs else [ ];
    optionalString = cond: s: if cond then s else "";
    escapeShellArgs = args: concatStringsSep " " (map escapeShellArg args);
    hasPrefix = prefix: s: builtins.substring 0 (builtins.stringLength prefix) s == prefix;
    unique = foldl' (acc: x: if elem x acc then acc else acc ++ [ x ]) [ ];
    getAttrs = names: set: listToAttrs (map (n: { name = n; value = set.${n}; }) names);
  };

  pkgs = rec {
    python3Minimal = fakeDrv "python3-minimal" { };
    buildPackages = { inherit python3Minimal; };
    writeText = name: text: fakeDrv name { inherit text; };
    writeShellScriptBin = name: text: fakeDrv name { inherit text; };
    runCommandLocal = name: env: script: fakeDrv name { inherit env script; };
  };

  utils = {
    fsNeededForBoot = fs:
      (fs.neededForBoot or false)
      || elem fs.mountPoint [ "/" "/nix" "/nix/store" "/var" "/var/log" "/var/lib" "/var/lib/nixos" "/etc" "/usr" ];
  };

  icfg = {
    fileSystems = { };
    deviceTimeout = 30;
    verbose = false;
    emergencyOnError = false;
    checkConfig = false;
    python = pkgs.python3Minimal;
    package = fakeDrv "impermanence-boot" { };
  } // impermanence;

  config = {
    environment.persistence = persistence;
    users.users = users;
    users.groups = groups;
    fileSystems = mapAttrs (mountPoint: fs: { inherit mountPoint; neededForBoot = false; } // fs) fileSystems;
    boot.initrd.systemd.enable = systemdInitrd;
    boot.initrd.impermanence = icfg;
  };

  module = import ../module.nix { inherit config lib pkgs utils; };

  # Resolve mkIf / mkMerge / mkAfter into plain values.
  resolve = v:
    if isAttrs v && (v._type or null) == "if" then (if v.condition then resolve v.content else null)
    else if isAttrs v && (v._type or null) == "merge" then
      foldl' merge null (map resolve v.contents)
    else if isAttrs v && (v._type or null) == "order" then resolve v.content
    else if isAttrs v && !(v ? outPath) && (v._type or null) == null then
      listToAttrs (filter (x: x.value != null)
        (map (n: { name = n; value = resolve v.${n}; }) (attrNames v)))
    else v;

  merge = a: b:
    if a == null then b
    else if b == null then a
    else if isAttrs a && isAttrs b && !(a ? outPath) then
      a // mapAttrs (n: bv: if a ? ${n} then merge a.${n} bv else bv) b
    else if isList a && isList b then a ++ b
    else if isString a && isString b then a + "\n" + b
    else throw "module-stub: conflicting definitions";

  resolved = resolve module.config;

  # Option names declared at each level (submodules called with a sample).
  submoduleOptions = t: args:
    let
      inner = if t.name == "coercedTo" then t.to else t;
      m = inner.module;
    in
    (if builtins.isFunction m then m args else m).options;
  locationOptions = submoduleOptions module.options.environment.persistence.type.elem
    { name = "/persistent"; config = sampleLocation; };
  sampleLocation = {
    persistentStoragePath = "/persistent";
    hideMounts = false;
    enableDebugging = false;
  };
  sampleItem = { directory = "d"; file = "f"; };
  userOptions = submoduleOptions locationOptions.users.type.elem
    { name = "bird"; config = { home = "/home/bird"; }; };
  optionNames = set: filter (n: (set.${n}._type or null) == "option") (attrNames set);
in
{
  inherit resolved;
  # The generated JSON (null with checkConfig: then the check step's output).
  configText =
    if resolved ? environment then resolved.environment.etc."impermanence.json".source.text or null
    else null;
  # With checkConfig: the build step that checks the JSON.
  checkScript =
    if resolved ? environment then resolved.environment.etc."impermanence.json".source.script or null
    else null;
  options = {
    top = attrNames module.options.boot.initrd.impermanence;
    location = optionNames locationOptions;
    user = optionNames userOptions;
    directory = optionNames (submoduleOptions locationOptions.directories.type.elem { config = sampleItem; });
    file = optionNames (submoduleOptions locationOptions.files.type.elem { config = sampleItem; });
    parentDirectory = attrNames (submoduleOptions locationOptions.files.type.elem { config = sampleItem; }).parentDirectory;
    userDirectory = optionNames (submoduleOptions userOptions.directories.type.elem { config = sampleItem; });
  };
  defaults = {
    location = mapAttrs (_: o: o.default or null)
      (lib.getAttrs [ "enable" "persistentStoragePath" "hideMounts" "enableWarnings" ] locationOptions);
    directory = mapAttrs (_: o: o.default or null)
      (lib.getAttrs [ "user" "group" "mode" "persistentStoragePath" "hideMount" ]
        (submoduleOptions locationOptions.directories.type.elem { config = sampleItem; }));
    userDirectory = mapAttrs (_: o: o.default or null)
      (lib.getAttrs [ "user" "group" "mode" ]
        (submoduleOptions userOptions.directories.type.elem { config = sampleItem; }));
    file = mapAttrs (_: o: o.default or null)
      (lib.getAttrs [ "method" ] (submoduleOptions locationOptions.files.type.elem { config = sampleItem; }));
    userHome = userOptions.home.default;
  };
}
